"""GGUF blocks on torch (dn_torch/gguf.py, the C kernel dn/formats/csrc/gguf.c), one thread unless said, one run:
- kernel: y = x W^T at T=1 on Qwen2.5-1.5B's shapes (MLP 1536x8960 and 8960x1536, q/o 1536x1536, k/v 256x1536,
  lm_head 151936x1536) held as Q4_K and Q6_K blocks, and the default model's Q4_1 1536x576 and Q8_0 lm_head
  49152x576 (random codes, fp16 scales about 0.02), as GB/s of blocks streamed: the float kernel (float32 x, exact),
  the integer path (bfloat16 x to 8 bits per 32, VNNI dots) and torch's dense bf16 F.linear of the same shape,
  interleaved; the integer path at torch's default thread count beside one thread (its own pool, not OpenMP);
- crossover: both kernel paths against the prefill path (rows decoded, then torch's matmul) over token counts, on
  the default model's 1536x576 Q4_1 (dn_torch.gguf._KERNEL_TOKENS);
- decode: greedy tok/s of the default model's native folder at --dtype auto (bfloat16 on a CPU: the integer path),
  at float32 (the float kernel) and its dense bf16 widening, steps interleaved (dn.runtime.timing.interleaved) so
  shared cores load each the same; at one thread and at torch's default count;
  and again in a child process under OMP_WAIT_POLICY=PASSIVE (torch's OpenMP threads then sleep, not spin);
- qwen: Qwen2.5-Coder-1.5B's native folder at auto and at float32, a few steps interleaved (skipped when absent);
- peer: llama.cpp's llama-bench (-t 1 -lm none, when dn.bench.peers has built it) on the same GGUF, one repetition
  between rounds of dn's decode at auto: tok/s ratios within one run;
- quality: perplexity on tests/data/eval-small.txt (windows of 256) with every matmul through the float kernel
  (float32), the integer path (bfloat16: what each decode step computes) and the prefill path (bfloat16 rows);
- profile: one decode step of the default model at auto: time inside the GGUF matmuls (kernel and its Python
  wrapper) and outside them (transformers' layer code, torch's small ops).

    PYTHONPATH=. python benchmarks/bench_gguf.py [--reps 40] [--tokens 64] [--json docs/results/gguf-kernel.json]
"""

import argparse
import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dn.bench import peers
from dn.bench.runner import Greedy
from dn.formats import gguf_blocks as gb
from dn.runtime import loader, timing
from dn_torch import gguf as tg

PROMPT = "What is the capital of France?"
QWEN = "qwen2.5-coder-1.5b"
SHAPES = {"Q4_K": [(1536, 8960), (8960, 1536), (1536, 1536), (256, 1536), (151936, 1536)], "Q6_K": None,
          "Q4_1": [(1536, 576)], "Q8_0": [(49152, 576)]}
BF16 = gb.BF16_X | gb.BF16_Y  # the integer path as a bfloat16 model runs it: x and y bf16
SCALE_AT = {"Q4_K": (0, 2), "Q6_K": (208,), "Q4_1": (0, 2), "Q8_0": (0,)}


def blocks(name: str, m: int, k: int, rng) -> np.ndarray:
    """Random blocks [m, row_bytes] whose fp16 fields (d, dmin) are 0.02: finite, typical weights."""
    _, bw, bb = gb.TYPES[name]
    raw = rng.integers(0, 256, (m * k // bw, bb), dtype=np.uint8)
    for a in SCALE_AT[name]:
        raw[:, a:a + 2] = np.full((len(raw), 1), 0.02, np.float16).view(np.uint8)
    return raw.reshape(m, -1)


def kernel(reps: int, threads: int) -> list[dict]:
    rng, out, lib = np.random.default_rng(0), [], gb.native()
    for name, shapes in SHAPES.items():
        for m, k in shapes or SHAPES["Q4_K"]:
            raw = torch.from_numpy(blocks(name, m, k, rng))
            x = torch.randn(1, k)
            xb, y, yb = x.bfloat16(), torch.empty(1, m), torch.empty(1, m, dtype=torch.bfloat16)
            fns = {"float": partial(gb.matmul_native, lib, name, raw, x, y, 1),
                   "int8": partial(gb.matmul_q8_native, lib, name, raw, xb, yb, 1, BF16),
                   f"int8@{threads}": partial(gb.matmul_q8_native, lib, name, raw, xb, yb, threads, BF16),
                   "dense": partial(F.linear, xb, torch.randn(m, k).bfloat16())}
            n = max(5, min(reps, int(reps * 8e6 / raw.numel())))  # the big lm_heads: fewer rounds
            t = timing.interleaved(fns, reps=n, warmup=2)
            gbs = {p: raw.numel() / t[p]["median_s"] / 1e9 for p in fns}
            out.append({"kind": "kernel", "type": name, "shape": [m, k], "tokens": 1, "block_bytes": raw.numel(),
                        "rounds": n, "float_us": 1e6 * t["float"]["median_s"], "float_gb_per_s": gbs["float"],
                        "int8_us": 1e6 * t["int8"]["median_s"], "int8_gb_per_s": gbs["int8"],
                        "int8_threads": threads, "int8_default_threads_gb_per_s": gbs[f"int8@{threads}"],
                        "dense_bf16_us": 1e6 * t["dense"]["median_s"],
                        "dense_bf16_gb_per_s": 2 * m * k / t["dense"]["median_s"] / 1e9,
                        "int8_vs_float": t["float"]["median_s"] / t["int8"]["median_s"],
                        "int8_vs_dense_bf16": t["dense"]["median_s"] / t["int8"]["median_s"]})
            r = out[-1]
            print(f"{name} {m}x{k}: float {r['float_gb_per_s']:.1f} GB/s, int8 {r['int8_gb_per_s']:.1f} "
                  f"(@{threads} {r['int8_default_threads_gb_per_s']:.1f}), dense bf16 {r['dense_bf16_gb_per_s']:.1f}",
                  file=sys.stderr)
    return out


def crossover(reps: int) -> list[dict]:
    raw = torch.from_numpy(blocks("Q4_1", 1536, 576, np.random.default_rng(1)))
    lib, out = gb.native(), []
    for t in (1, 4, 8, 16, 32, 64, 96):
        x, y = torch.randn(t, 576), torch.empty(t, 1536)
        xb, yb = x.bfloat16(), y.bfloat16()
        keep, tg._KERNEL_TOKENS = tg._KERNEL_TOKENS, -1  # the prefill path
        try:
            r = timing.interleaved({"float": partial(gb.matmul_native, lib, "Q4_1", raw, x, y, 1),
                                    "int8": partial(gb.matmul_q8_native, lib, "Q4_1", raw, xb, yb, 1, BF16),
                                    "plain": partial(tg.matmul, xb, raw, "Q4_1")}, reps=reps, warmup=2)
        finally:
            tg._KERNEL_TOKENS = keep
        out.append({"kind": "crossover", "type": "Q4_1", "shape": [1536, 576], "tokens": t} |
                   {f"{p}_us": 1e6 * v["median_s"] for p, v in r.items()})
        print("crossover T={tokens}: float {float_us:.0f} us, int8 {int8_us:.0f}, plain bf16 {plain_us:.0f}"
              .format(**out[-1]), file=sys.stderr)
    return out


def _steps(runs: dict, threads: int) -> dict:
    """Greedy decoders, each step run at `threads` torch threads (the kernels follow torch's count)."""
    def at(g):
        def step():
            torch.set_num_threads(threads)
            g.step()
        return step
    return {name: at(Greedy(r.backend, r.model, [r.tokenizer.encode(PROMPT)])) for name, r in runs.items()}


def default_runs() -> dict:
    return {"native auto": loader.load(None, "torch", "auto"), "native float32": loader.load(None, "torch", "float32"),
            "dense bfloat16": loader.load(None, "torch", "bfloat16", dense=True)}


def passive(steps: int, threads: int) -> list[dict]:
    """decode at 1 and `threads` threads in a child under OMP_WAIT_POLICY=PASSIVE (read when OpenMP loads)."""
    r = subprocess.run([sys.executable, __file__, "--child-threads", str(threads), "--tokens", str(steps)],
                       env=os.environ | {"OMP_WAIT_POLICY": "PASSIVE"}, capture_output=True, text=True)
    if r.returncode:
        print(f"bench_gguf: the PASSIVE child failed: {r.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return []
    print(r.stderr, end="", file=sys.stderr)
    return [rec | {"omp_wait_policy": "PASSIVE"} for rec in json.loads(r.stdout)]


def decode(runs: dict, steps: int, threads: int, model: str, base: str | None) -> list[dict]:
    t = timing.interleaved(_steps(runs, threads), reps=steps, warmup=3)
    out = []
    for name, run in runs.items():
        rec = {"kind": "decode", "model": model, "config": name.split()[0], "dtype": run.dtype, "threads": threads,
               "folder": run.model_dir.name, "tokens_per_s": 1 / t[name]["median_s"],
               "latency_ms_p50": 1e3 * t[name]["median_s"], "latency_ms_iqr": 1e3 * t[name]["iqr_s"],
               "decode_steps": steps}
        if base:
            rec["vs_dense_bf16"] = t[base]["median_s"] / t[name]["median_s"]
        out.append(rec)
        print(f"decode {model} {name} @{threads}: {rec['tokens_per_s']:.1f} tok/s", file=sys.stderr)
    return out


def peer(run, model: str, rounds: int, tokens: int) -> list[dict]:
    """llama-bench (one repetition of `tokens` decoded, -lm none) between rounds of `tokens` dn steps at auto."""
    bench = peers.llama_cpp_dir() / "bin" / "llama-bench"
    if not bench.is_file():
        print("bench_gguf: no llama.cpp build (nox -s peers builds it): peer skipped", file=sys.stderr)
        return []
    cmd = [str(bench), "-m", str(peers.gguf_path(None if model == "default" else model)), "-t", "1", "-p", "0",
           "-n", str(tokens), "-r", "1", "-lm", "none", "-o", "json"]
    step, dn, llama = _steps({"dn": run}, 1)["dn"], [], []
    step()
    for _ in range(rounds):
        for _ in range(tokens):
            t0 = time.perf_counter()
            step()
            dn.append(time.perf_counter() - t0)
        res = peers.parse_bench(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        llama += res["decode"]["samples_ts"]
    rec = {"kind": "peer", "model": model, "threads": 1, "dtype": run.dtype, "rounds": rounds, "tokens": tokens,
           "dn_tokens_per_s": 1 / float(np.median(dn)), "llama_cpp_tokens_per_s": float(np.median(llama)),
           "llama_cpp_command": cmd}
    rec["dn_vs_llama_cpp"] = rec["dn_tokens_per_s"] / rec["llama_cpp_tokens_per_s"]
    print(f"peer {model}: dn {rec['dn_tokens_per_s']:.1f} tok/s, llama.cpp {rec['llama_cpp_tokens_per_s']:.1f} "
          f"({rec['dn_vs_llama_cpp']:.2f}x)", file=sys.stderr)
    return [rec]


def quality(model: str | None, tokens: int, window: int = 256) -> list[dict]:
    """Perplexity through each path, _KERNEL_TOKENS forced: a window through the kernels is its tokens' decode
    steps' arithmetic (x quantized per token either way)."""
    text, out, keep = Path("tests/data/eval-small.txt").read_text(), [], tg._KERNEL_TOKENS
    try:
        for path, dtype, limit in (("float kernel", "float32", 1 << 30), ("integer path", "bfloat16", 1 << 30),
                                   ("prefill path", "bfloat16", -1)):
            run = loader.load(model, "torch", dtype)
            ids, tg._KERNEL_TOKENS = run.tokenizer.encode(text)[:tokens], limit
            nll = np.concatenate([run.backend.token_nll(run.model, np.array([ids[i:i + window]]))[0]
                                  for i in range(0, len(ids) - 1, window) if len(ids[i:i + window]) > 1])
            out.append({"kind": "quality", "model": model or "default", "path": path, "dtype": dtype,
                        "text": "tests/data/eval-small.txt", "tokens_scored": len(nll), "window": window,
                        "ppl": float(np.exp(nll.mean()))})
            out[-1]["vs_float_kernel"] = out[-1]["ppl"] / out[0]["ppl"] - 1
            print(f"quality {model or 'default'} {path} {dtype}: ppl {out[-1]['ppl']:.3f} "
                  f"({100 * out[-1]['vs_float_kernel']:+.2f}%)", file=sys.stderr)
            del run
    finally:
        tg._KERNEL_TOKENS = keep
    return out


def profile(run, steps: int) -> dict:
    """One decode step split: inside dn_torch.gguf.matmul (the kernels and their Python wrapper) and outside."""
    step = _steps({"p": run}, 1)["p"]
    for _ in range(3):
        step()
    inside, calls, real = [0.0], [0], tg.matmul

    def timed(*a, **kw):
        t0 = time.perf_counter()
        try:
            return real(*a, **kw)
        finally:
            inside[0] += time.perf_counter() - t0
            calls[0] += 1

    tg.matmul = timed
    try:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        total = (time.perf_counter() - t0) / steps
    finally:
        tg.matmul = real
    rec = {"kind": "profile", "model": "default", "dtype": run.dtype, "threads": 1, "steps": steps,
           "step_ms": 1e3 * total, "matmul_ms": 1e3 * inside[0] / steps, "matmul_calls": calls[0] // steps}
    rec["outside_share"] = 1 - rec["matmul_ms"] / rec["step_ms"]
    print(f"profile: step {rec['step_ms']:.1f} ms, matmuls {rec['matmul_ms']:.1f} ms ({rec['matmul_calls']} calls), "
          f"{100 * rec['outside_share']:.0f}% outside", file=sys.stderr)
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=64, help="decode steps timed per config")
    ap.add_argument("--qwen-tokens", type=int, default=12, help="decode steps timed per Qwen config (0: skip)")
    ap.add_argument("--peer-rounds", type=int, default=4, help="rounds against llama-bench (0: skip)")
    ap.add_argument("--json", default="docs/results/gguf-kernel.json")
    ap.add_argument("--child-threads", type=int, default=0, help=argparse.SUPPRESS)  # passive()'s child
    args = ap.parse_args()
    default_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    if args.child_threads:
        runs = default_runs()
        print(json.dumps([r for th in (1, args.child_threads) for r in decode(runs, args.tokens, th, "default",
                                                                               "dense bfloat16")]))
        return 0
    lib = gb.native()
    if lib is None:
        print("bench_gguf: no C kernel here (DN_NATIVE=0 or no compiler)", file=sys.stderr)
        return 2
    if not lib.q8:
        print("bench_gguf: no AVX512_VNNI here: bfloat16 takes the float kernel; kernel records skip int8",
              file=sys.stderr)
        return 2
    records = kernel(args.reps, default_threads) + crossover(args.reps)
    runs = default_runs()
    for threads in sorted({1, default_threads}):
        records += decode(runs, args.tokens, threads, "default", "dense bfloat16")
    if default_threads > 1:
        records += passive(args.tokens, default_threads)
    records.append(profile(runs["native auto"], args.tokens))
    if args.peer_rounds:
        records += peer(runs["native auto"], "default", args.peer_rounds, 32)
    del runs
    records += quality(None, 2048)
    if args.qwen_tokens:
        try:
            qwen = {"native auto": loader.load(QWEN, "torch", "auto")}
        except Exception as e:  # absent (the qwen extra not installed): said, skipped
            print(f"bench_gguf: {QWEN} skipped ({e})", file=sys.stderr)
        else:
            qwen["native float32"] = loader.load(QWEN, "torch", "float32")
            records += decode(qwen, args.qwen_tokens, 1, QWEN, None)
            del qwen["native float32"]
            if args.peer_rounds:
                records += peer(qwen["native auto"], QWEN, args.peer_rounds, 8)
            del qwen
            records += quality(QWEN, 1024)
    load = list(np.round(np.loadtxt("/proc/loadavg", usecols=(0, 1, 2)), 2))
    timing.write(timing.report(records, threads=1, default_threads=default_threads, loadavg_end=load,
                               kernel_isa="avx512 + avx512_vnni (integer path)"), args.json)
    print(json.dumps({"written": args.json}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
