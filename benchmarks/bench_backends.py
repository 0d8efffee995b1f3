"""Prefill and decode speed of both backends on this machine, same model and dtype: the measurement
behind `--backend auto` picking torch on a CPU. Ratios are against torch measured in the same run.

    python benchmarks/bench_backends.py [--dtype float32] [--prompt-tokens 128] [--decode-tokens 32] [--json OUT]

Timer and JSON: dn.runtime.timing (one record per backend).
"""

import argparse
import gc
import sys

import numpy as np

from dn.model.sources import resolve_model
from dn.model.spec import load_spec
from dn.runtime import backend as backends
from dn.runtime import timing


def measure(name: str, model_dir, spec, dtype: str, n_prompt: int, n_decode: int) -> dict:
    """One prefill of n_prompt tokens after a short warm-up one, then n_decode steps: tokens/s at the median."""
    be = backends.get(name)
    model = be.load(model_dir, spec, dtype)
    prompt = np.random.default_rng(0).integers(100, 40000, size=(1, n_prompt))
    be.logits(model, prompt[:, :8], be.make_cache(model), last_only=True)  # warm-up
    cache = be.make_cache(model)
    prefill = timing.timer(lambda: be.logits(model, prompt, cache, last_only=True), reps=1, warmup=0)
    steps = iter(range(n_decode))

    def step():  # the prompt's tokens again, one per step, into the prefilled cache
        i = next(steps)
        be.logits(model, prompt[:, i:i + 1], cache, last_only=True)

    decode = timing.timer(step, reps=n_decode, warmup=0)
    return {"backend": name, "device": be.device_name(), "prefill_tok_s": n_prompt / prefill["median_s"],
            "decode_tok_s": 1 / decode["median_s"]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    model_dir = resolve_model(None)
    spec = load_spec(model_dir)
    records = []
    for name in ("torch", "mlx"):
        records.append(measure(name, model_dir, spec, args.dtype, args.prompt_tokens, args.decode_tokens))
        gc.collect()
    for r in records:
        r["prefill_vs_torch"] = r["prefill_tok_s"] / records[0]["prefill_tok_s"]
        r["decode_vs_torch"] = r["decode_tok_s"] / records[0]["decode_tok_s"]
        print(f"{r['backend']:<6} {r['device']:<10} prefill {r['prefill_tok_s']:8.1f} tok/s "
              f"({r['prefill_vs_torch']:.2f}x)  decode {r['decode_tok_s']:7.1f} tok/s ({r['decode_vs_torch']:.2f}x)")
    if args.json:
        timing.write(timing.report(records, ["python", "benchmarks/bench_backends.py", *sys.argv[1:]],
                                   dtype=args.dtype, prompt_tokens=args.prompt_tokens,
                                   decode_tokens=args.decode_tokens), args.json)


if __name__ == "__main__":
    main()
