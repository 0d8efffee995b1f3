"""Prefill and decode speed of both backends on this machine, same model and dtype: the measurement
behind `--backend auto` picking torch on a CPU. Ratios are against torch measured in the same run.

    python benchmarks/bench_backends.py [--dtype float32] [--prompt-tokens 128] [--decode-tokens 32]
"""

import argparse
import gc
import json
import platform
import time

import numpy as np

from dn.model.sources import resolve_model
from dn.model.spec import load_spec
from dn.runtime import backend as backends


def measure(name: str, model_dir, spec, dtype: str, n_prompt: int, n_decode: int) -> dict:
    be = backends.get(name)
    model = be.load(model_dir, spec, dtype)
    prompt = np.random.default_rng(0).integers(100, 40000, size=(1, n_prompt))
    be.logits(model, prompt[:, :8], be.make_cache(model), last_only=True)  # warm-up
    cache = be.make_cache(model)
    t0 = time.perf_counter()
    be.logits(model, prompt, cache, last_only=True)
    t1 = time.perf_counter()
    for i in range(n_decode):
        be.logits(model, prompt[:, i:i + 1], cache, last_only=True)
    t2 = time.perf_counter()
    return {"device": be.device_name(), "prefill_tok_s": n_prompt / (t1 - t0), "decode_tok_s": n_decode / (t2 - t1)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    model_dir = resolve_model(None)
    spec = load_spec(model_dir)
    res = {}
    for name in ("torch", "mlx"):
        res[name] = measure(name, model_dir, spec, args.dtype, args.prompt_tokens, args.decode_tokens)
        gc.collect()
    for name, r in res.items():
        r["prefill_vs_torch"] = r["prefill_tok_s"] / res["torch"]["prefill_tok_s"]
        r["decode_vs_torch"] = r["decode_tok_s"] / res["torch"]["decode_tok_s"]
        print(f"{name:<6} {r['device']:<10} prefill {r['prefill_tok_s']:8.1f} tok/s ({r['prefill_vs_torch']:.2f}x)  "
              f"decode {r['decode_tok_s']:7.1f} tok/s ({r['decode_vs_torch']:.2f}x)")
    out = {"machine": f"{platform.system()} {platform.machine()}", "dtype": args.dtype, "results": res,
           "prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
