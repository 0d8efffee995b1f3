"""GGUF blocks on torch (dn_torch/gguf.py, the C kernel dn/formats/csrc/gguf.c), one thread, one run:
- kernel: y = x W^T at T=1 on Qwen2.5-1.5B's MLP shapes (1536x8960 and 8960x1536) held as Q4_K and Q6_K blocks
  (random codes, fp16 scales about 0.02), as GB/s of blocks streamed, beside torch's dense bf16 F.linear of the same
  shape (the baseline, timed in the same run);
- crossover: the kernel against the prefill path (rows decoded, then torch's matmul) over token counts, on the
  default model's 1536x576 Q4_1 (dn_torch.gguf._KERNEL_TOKENS);
- decode: greedy tok/s of the default model's native folder at float32 and bfloat16 against its dense bf16
  widening, steps interleaved (dn.runtime.timing.interleaved) so that shared cores load each the same.

    PYTHONPATH=. python benchmarks/bench_gguf.py [--reps 40] [--tokens 64] [--json docs/results/gguf-kernel.json]
"""

import argparse
import sys
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from dn.bench.runner import Greedy
from dn.formats import gguf_blocks as gb
from dn.runtime import loader, timing
from dn_torch import gguf as tg

PROMPT = "What is the capital of France?"


def blocks(name: str, m: int, k: int, rng) -> np.ndarray:
    """Random blocks [m, row_bytes] whose fp16 fields (d, dmin) are 0.02: finite, typical weights."""
    _, bw, bb = gb.TYPES[name]
    raw = rng.integers(0, 256, (m * k // bw, bb), dtype=np.uint8)
    at = {"Q4_K": (0, 2), "Q6_K": (208,), "Q4_1": (0, 2)}[name]
    for a in at:
        raw[:, a:a + 2] = np.full((len(raw), 1), 0.02, np.float16).view(np.uint8)
    return raw.reshape(m, -1)


def kernel(reps: int) -> list[dict]:
    rng, out = np.random.default_rng(0), []
    lib = gb.native()
    for name in ("Q4_K", "Q6_K"):
        for m, k in ((1536, 8960), (8960, 1536)):
            raw = blocks(name, m, k, rng)
            x, y = rng.standard_normal((1, k), np.float32), np.empty((1, m), np.float32)
            t = timing.timer(partial(gb.matmul_native, lib, name, raw, x, y, 1), reps=reps, warmup=3)
            w, xb = torch.randn(m, k).bfloat16(), torch.from_numpy(x).bfloat16()
            base = timing.timer(partial(F.linear, xb, w), reps=reps, warmup=3)
            out.append({"kind": "kernel", "type": name, "shape": [m, k], "tokens": 1, "block_bytes": raw.nbytes,
                        "us": 1e6 * t["median_s"], "gb_per_s": raw.nbytes / t["median_s"] / 1e9,
                        "dense_bf16_us": 1e6 * base["median_s"],
                        "dense_bf16_gb_per_s": 2 * m * k / base["median_s"] / 1e9,
                        "speedup_vs_dense_bf16": base["median_s"] / t["median_s"]})
            print(f"{name} {m}x{k} T=1: {out[-1]['us']:.0f} us, {out[-1]['gb_per_s']:.2f} GB/s "
                  f"(dense bf16 {out[-1]['dense_bf16_us']:.0f} us)", file=sys.stderr)
    return out


def crossover(reps: int) -> list[dict]:
    raw = torch.from_numpy(blocks("Q4_1", 1536, 576, np.random.default_rng(1)))
    lib, out = gb.native(), []
    for t in (1, 4, 8, 16, 32, 64, 96):
        x, y = torch.randn(t, 576), torch.empty(t, 1536)
        fast = timing.timer(partial(gb.matmul_native, lib, "Q4_1", raw, x, y, 1), reps=reps, warmup=2)["median_s"]
        keep, tg._KERNEL_TOKENS = tg._KERNEL_TOKENS, -1  # the prefill path
        try:
            plain = timing.timer(partial(tg.matmul, x, raw, "Q4_1"), reps=reps, warmup=2)["median_s"]
        finally:
            tg._KERNEL_TOKENS = keep
        out.append({"kind": "crossover", "type": "Q4_1", "shape": [1536, 576], "tokens": t, "kernel_us": 1e6 * fast,
                    "plain_us": 1e6 * plain})
        print(f"crossover T={t}: kernel {1e6 * fast:.0f} us, plain {1e6 * plain:.0f} us", file=sys.stderr)
    return out


def decode(reps: int, tokens: int) -> list[dict]:
    runs = {"native float32": loader.load(None, "torch", "float32"),
            "native bfloat16": loader.load(None, "torch", "bfloat16"),
            "dense bfloat16": loader.load(None, "torch", "bfloat16", dense=True)}
    steps = {}
    for name, run in runs.items():
        ids = run.tokenizer.encode(PROMPT)
        steps[name] = Greedy(run.backend, run.model, [ids])
    t = timing.interleaved({k: g.step for k, g in steps.items()}, reps=tokens, warmup=4)
    base = t["dense bfloat16"]["median_s"]
    out = []
    for name, run in runs.items():
        out.append({"kind": "decode", "config": name.split()[0], "dtype": run.dtype, "folder": run.model_dir.name,
                    "tokens_per_s": 1 / t[name]["median_s"], "latency_ms_p50": 1e3 * t[name]["median_s"],
                    "latency_ms_iqr": 1e3 * t[name]["iqr_s"], "decode_steps": tokens,
                    "vs_dense_bf16": base / t[name]["median_s"],
                    "first_tokens": run.tokenizer.decode(steps[name].tokens[0][:8])})
        print(f"decode {name}: {out[-1]['tokens_per_s']:.1f} tok/s ({out[-1]['vs_dense_bf16']:.2f}x dense bf16)",
              file=sys.stderr)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=64, help="decode steps timed per config")
    ap.add_argument("--json", default="docs/results/gguf-kernel.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if gb.native() is None:
        print("bench_gguf: no C kernel here (DN_NATIVE=0 or no compiler)", file=sys.stderr)
        return 2
    records = kernel(args.reps) + crossover(args.reps) + decode(args.reps, args.tokens)
    timing.write(timing.report(records, threads=1, kernel_isa="avx512" if gb.native().dn_gguf_isa() else "plain C"),
                 args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
