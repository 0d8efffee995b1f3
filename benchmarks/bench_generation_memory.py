"""The process's memory while generating from a long prompt, beyond the weights: the default model, a prompt of
--prompt-tokens from the evaluation text, then --max-tokens decoded. Each row in its own process (a first load
measures exactly, dn.runtime.memory): the framework baseline before the load, the weights after it, the KV cache
(its arrays' bytes at the end), and the peak while generating (dn.runtime.memory.Monitor: VmHWM on torch's CPU,
the allocator's peak on MLX) with what it held beyond weights and KV cache (activations, logits, freed pages the
allocator kept).

Prefill modes: `before` is the prompt in one forward, as dn ran it before (on MLX, its [T, V] logits computed and
sliced to the last); `after` is dn.runtime.generation.generate_tokens now (PREFILL_STEP tokens a forward, the
last position's logits only, on MLX never computed for the rest); `all-logits` is one forward asking for every
position's logits (what a prompt costs without logits_to_keep), for scale.

    python benchmarks/bench_generation_memory.py --backends torch,mlx --json docs/results/generation-memory.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time

import numpy as np

from dn.core.text import read_text, text_path
from dn.runtime import generation, loader, memory, timing

MODES = ("before", "after", "all-logits")


def kv_bytes(cache) -> int:
    """The KV cache's array bytes: mlx-lm's caches say theirs, transformers' layers hold keys and values."""
    if isinstance(cache, list):
        return sum(c.nbytes for c in cache)
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None and hasattr(t, "numel"))


def child(job: dict) -> dict:
    run = loader.load(job["model"], job["backend"], "auto")
    be, model = run.backend, run.model
    ids = run.tokenizer.encode(read_text(text_path(None, "DN_EVAL_TEXT"))[:16 * job["prompt_tokens"]])
    ids = ids[:job["prompt_tokens"]]
    memory._settle(be)  # the tokenizer's freed pages leave: the prompt's own activations must show in the RSS
    mon = memory.Monitor(be, run.memory)
    process_base = memory.snapshot()["rss"] - run.memory["rss_bytes"]  # on MLX, the allocator's base is 0
    mon.reset()
    t = time.perf_counter()
    cache = be.make_cache(model)
    if job["mode"] == "after":
        tokens = list(generation.generate_tokens(be, model, ids, job["max_tokens"], cache=cache))
    else:
        if job["mode"] == "all-logits":
            last = be.logits(model, np.array([ids]), cache)[0, -1]
        elif be.NAME == "mlx":  # dn_mlx.model.logits before: the whole prompt's logits, then its last position
            import mlx.core as mx  # late: the MLX rows only

            last = np.array(model(mx.array([ids]), cache=cache)[0, -1].astype(mx.float32))
        else:  # torch: one forward, logits_to_keep=1 (as before)
            last = be.logits(model, np.array([ids]), cache, last_only=True)[0, -1]
        tokens = [int(last.argmax())]
        for _ in range(job["max_tokens"] - 1):
            tokens.append(int(be.logits(model, np.array([[tokens[-1]]]), cache, last_only=True)[0, -1].argmax()))
    seconds = time.perf_counter() - t
    peak, kv, weights = mon.peak(), kv_bytes(cache), run.memory["measured_resident_bytes"]
    return {"backend": be.NAME, "device": be.device_name(), "dtype": run.dtype, "mode": job["mode"],
            "prompt_tokens": len(ids), "generated_tokens": len(tokens), "tokens": tokens, "seconds": seconds,
            "framework_baseline_bytes": mon.base, "process_baseline_rss_bytes": process_base,
            "weights_bytes": weights, "kv_cache_bytes": kv,
            "peak_above_baseline_bytes": peak, "peak_beyond_weights_and_kv_bytes": peak - weights - kv,
            "held_after_bytes": mon.now(), "measured_kind": mon.kind,
            "vocab": int(run.spec.architecture.vocab_size),
            "all_logits_float32_bytes": 4 * len(ids) * int(run.spec.architecture.vocab_size)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--backends", default="torch")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--prompt-tokens", default="1000",
                   help="prompt lengths, comma-separated, each for every backend or one (mlx:256: MLX's CPU is slow)")
    p.add_argument("--max-tokens", type=int, default=8)
    args = p.parse_args()
    if args.one:  # a row's process
        return print(json.dumps(child(json.loads(args.one)))) or 0
    records = []
    for backend, length, mode in itertools.product(args.backends.split(","), args.prompt_tokens.split(","),
                                                   args.modes.split(",")):
        if ":" in length and length.split(":")[0] != backend:
            continue
        length = length.split(":")[-1]
        job = {"model": args.model, "backend": backend, "mode": mode, "prompt_tokens": int(length),
               "max_tokens": args.max_tokens}
        out = subprocess.run([sys.executable, __file__, "--one", json.dumps(job)], check=True,
                             capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        records.append(r)
        mib = lambda k, r=r: f"{r[k] / 2**20:7.1f}"
        print(f"{backend:5} {length:>5} {mode:10} base {mib('framework_baseline_bytes')} "
              f"weights {mib('weights_bytes')} kv {mib('kv_cache_bytes')} peak {mib('peak_above_baseline_bytes')} "
              "(beyond weights+kv "
              f"{mib('peak_beyond_weights_and_kv_bytes')}) MiB; {r['seconds']:.1f} s", flush=True)
    if args.json:
        timing.write(timing.report(records, ["python", *sys.argv], loadavg=os.getloadavg(),
                                   prefill_step=generation.PREFILL_STEP), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
