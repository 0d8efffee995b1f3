"""Lossless codec speed on the device it runs on (torch): decode throughput (GB/s of 16-bit output) and
one projection's decode-step latency at batch 1, 4 and 16, compressed vs dense, ratios against the
dense baseline measured in the same run. CUDA: Triton decode and the fused decode+GEMV kernel;
CPU: the pure-torch decoder then a matmul.

    PYTHONPATH=. python benchmarks/bench_codec.py [--shapes 14336x4096,4096x14336] [--steps 512] [--json OUT]
    python benchmarks/bench_codec.py --model [--coded-dir DIR] [--dtype float32] [--json OUT]
    python benchmarks/bench_codec.py --fixed4 --threads 1 [--shapes S] [--json docs/results/bench-codec-fixed4-cpu.json]

--fixed4 (CPU): the runtime layout (dn.formats.fixed4) through dn_torch.codec: the C decode (GB/s of bf16 written)
and the pure-torch one, and per batch 1 and 4 torch's bf16 F.linear against the C fused decode+GEMV and against
the runtime's decode-then-F.linear; ratios are times over F.linear's in the same run (< 1: faster).

Weights are N(0, 0.02) rounded to bf16 (the exponent spread of trained layers); a shape is [out, in].
Timer and JSON: dn.runtime.timing (on CUDA, Triton's do_bench: CUDA events around the kernels, cache flushed).
"""

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dn.footprint import accounted
from dn.formats import fixed4, lossless
from dn.model.sources import resolve_model
from dn.model.spec import load_spec
from dn.runtime import backend as backends
from dn.runtime import memory, timing
from dn.runtime.writer import convert
from dn_torch import codec as tc

GPU_SHAPES = "4096x4096,14336x4096,4096x14336"
CPU_SHAPES = "1536x576,576x1536,2048x2048"


def timer(fn, device: str, reps: int) -> float:
    """Seconds per call: median on CUDA; minimum on CPU, where other processes' time slices land in
    some of the calls."""
    if device == "cuda":
        from triton.testing import do_bench  # CUDA only: Triton is not there on every machine

        return do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3
    return timing.timer(fn, reps=reps, warmup=1)["min_s"]


def bench_batch(p, w, shape, b: int, device: str, reps: int) -> dict:
    """One projection y = x W^T at batch b: dense, decode into scratch then matmul, fused (CUDA)."""
    x = torch.randn(b, shape[1], device=device).to(torch.bfloat16)
    scratch = torch.empty(p.n, dtype=torch.int16, device=device)

    def decode_then_matmul():
        p.decode(scratch)
        return torch.nn.functional.linear(x, scratch.view(torch.bfloat16).view(shape))

    dense = timer(lambda: torch.nn.functional.linear(x, w), device, reps)
    row = {"dense_s": dense, "decode_matmul_s": timer(decode_then_matmul, device, reps)}
    row["decode_matmul_vs_dense"] = row["decode_matmul_s"] / dense
    if device == "cuda":
        from dn_torch import _triton_codec  # CUDA only: needs Triton

        fused = timer(lambda: _triton_codec.matvec(p, x, shape), device, reps)
        y, ref = _triton_codec.matvec(p, x, shape).float(), x.float() @ w.float().T
        row.update(fused_s=fused, fused_vs_dense=fused / dense,
                   fused_max_rel_err=float((y - ref).abs().max() / ref.abs().max()))
    return row


def bench_shape(shape, device: str, reps: int, steps: int) -> dict:
    rng = np.random.default_rng(0)
    w32 = rng.normal(0, 0.02, shape).astype(np.float32)
    bits = (w32.view(np.uint32) >> 16).astype(np.uint16)  # truncation: any bf16 pattern is fine here
    t0 = time.perf_counter()
    enc = lossless.encode(bits, "bfloat16", steps=steps)
    encode_s = time.perf_counter() - t0
    p = tc.PackedLayer(lossless.pack({"": enc})).to(device)
    w = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).to(device)
    out = torch.empty(enc.n, dtype=torch.int16, device=device)
    assert torch.equal(p.decode(out).view(torch.bfloat16).view(shape), w), "decode is not bit-exact"
    r = {"shape": list(shape), "lanes": enc.lanes, "steps": enc.steps, "bits_per_weight": enc.bits_per_weight(),
         "encode_s_numpy": encode_s}
    t_dec = timer(lambda: p.decode(out), device, reps)
    t_copy = timer(lambda: out.copy_(w.view(-1).view(torch.int16)), device, reps)
    r["decode_GBps"] = 2 * enc.n / t_dec / 1e9
    if device == "cuda":  # the kernel alone, stream metadata computed once
        from dn_torch import _triton_codec  # CUDA only: needs Triton

        meta = _triton_codec._meta(p)
        t_kernel = timer(lambda: _triton_codec.decode(p.words, p.luts, p.raw, meta[0], meta[1], meta[2], meta[3],
                                                      out, p.lanes, p.steps, p.maxlen, True), device, reps)
        r["decode_kernel_GBps"] = 2 * enc.n / t_kernel / 1e9
    r["dense_copy_GBps"] = 2 * enc.n / t_copy / 1e9  # reads and writes 2 bytes per weight: 2x this moves
    r["batches"] = {str(b): bench_batch(p, w, shape, b, device, reps) for b in (1, 4, 16)}
    return r


def bench_model(coded_dir: str | None, dtype: str, reps: int) -> dict:
    """Decode-step latency of the default model, dense vs compressed (dn convert --codec lossless), on
    the torch backend, batch 1/4/16, after a 32-token prompt; resident weight bytes of both, accounted
    (dn.footprint) and measured (dn.runtime.memory; the coded load follows the dense one, see dn.runtime.memory on
    reuse)."""
    be = backends.get("torch")
    dense_dir = resolve_model(None, progress=False)
    if coded_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            convert(dense_dir, Path(tmp) / "coded", "lossless", None)
            return bench_model(str(Path(tmp) / "coded"), dtype, reps)
    res = {"model": str(dense_dir.name), "dtype": dtype, "device": be.device_name(), "batches": {}}
    models = {}
    for k, d in (("dense", dense_dir), ("coded", Path(coded_dir))):
        spec = load_spec(d)
        models[k], measured = memory.measure_load(be, d, spec, dtype)
        res[f"{k}_resident_bytes"] = accounted(spec, dtype, 0)["resident_weight_bytes"]
        res[f"{k}_measured_resident_bytes"] = measured["measured_resident_bytes"]
    prompt = np.random.default_rng(0).integers(100, 40000, size=(16, 32))
    for b in (1, 4, 16):
        row = {}
        for k, m in models.items():
            cache = be.make_cache(m)
            be.logits(m, prompt[:b], cache, last_only=True)
            step = timing.timer(lambda m=m, cache=cache, x=prompt[:b, :1]: be.logits(m, x, cache, last_only=True),
                                reps=reps, warmup=0)
            row[f"{k}_step_s"] = step["min_s"]
        row["coded_vs_dense"] = row["coded_step_s"] / row["dense_step_s"]
        res["batches"][str(b)] = row
        print(f"model {res['model']} {dtype} B={b}: dense {row['dense_step_s'] * 1e3:.1f} ms, "
              f"coded {row['coded_step_s'] * 1e3:.1f} ms ({row['coded_vs_dense']:.1f}x)", flush=True)
    return res


FIXED4_SHAPES = "4096x4096,14336x4096,4096x14336,1536x576,576x1536"


def bench_fixed4(shape, reps: int) -> dict:
    rng = np.random.default_rng(0)
    bits = (rng.normal(0, 0.02, shape).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    rt = fixed4.from_bits(bits, "bfloat16")
    w = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
    lin = tc.CodecLinear(rt, [torch.empty(rt.n, dtype=torch.bfloat16)], 0, None)
    assert torch.equal(lin.weight.view(torch.int16), w.view(torch.int16)), "decode is not bit-exact"
    n = rt.n
    r = {"shape": list(shape), "bits_per_weight": rt.bits_per_weight(), "escapes": int(rt.esc_index.size),
         "threads": torch.get_num_threads(), "native": fixed4.native() is not None}
    copy = torch.empty_like(w)
    t = {"decode": timing.timer(lambda: lin.weight, reps=reps),
         "copy": timing.timer(lambda: copy.copy_(w), reps=reps)}
    if n <= 4096 * 4096:  # the plain path is slow: small shapes only
        t["decode_torch"] = timing.timer(lambda: tc._decode_plain(lin), reps=max(3, reps // 4), warmup=1)
    for k, v in t.items():
        r[f"{k}_GBps"] = 2 * n / v["median_s"] / 1e9  # bf16 bytes written (the copy also reads as many)
    r["batches"] = {}
    for b in (1, 4):
        x = torch.randn(b, shape[1]).to(torch.bfloat16)
        dense = timing.timer(lambda x=x: torch.nn.functional.linear(x, w), reps=reps)["median_s"]
        fused = timing.timer(lambda x=x: tc.matvec_fixed4(lin, x), reps=reps)["median_s"]
        runtime = timing.timer(lambda x=x: lin(x), reps=reps)["median_s"]
        y, ref = tc.matvec_fixed4(lin, x), fixed4.matvec(rt, x.float().numpy())
        r["batches"][str(b)] = {"dense_s": dense, "fused_s": fused, "fused_vs_dense": fused / dense,
                                "decode_linear_s": runtime, "decode_linear_vs_dense": runtime / dense,
                                "fused_max_rel_err_vs_reference": float(np.abs(y.numpy() - ref).max()
                                                                        / np.abs(ref).max())}
    return r


def main_fixed4(args) -> None:
    shapes = [tuple(int(v) for v in s.split("x")) for s in (args.shapes or FIXED4_SHAPES).split(",")]
    records = []
    for shape in shapes:
        r = bench_fixed4(shape, args.reps)
        records.append(r)
        line = (f"{shape[0]}x{shape[1]}: {r['bits_per_weight']:.2f} bits/w, {r['escapes']} escapes, "
                f"decode {r['decode_GBps']:.3g} GB/s (torch {r.get('decode_torch_GBps', float('nan')):.3g}, "
                f"copy {r['copy_GBps']:.3g})")
        for b, row in r["batches"].items():
            line += (f" | B={b} fused {row['fused_vs_dense']:.2f}x, decode+linear {row['decode_linear_vs_dense']:.2f}x"
                     f" of {row['dense_s'] * 1e3:.3g} ms")
        print(line, flush=True)
    if args.json:
        timing.write(timing.report(records, device=f"{platform.processor() or platform.machine()} CPU",
                                   torch=torch.__version__), args.json)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default=None, help=f"OUTxIN,... (default cuda {GPU_SHAPES}, cpu {CPU_SHAPES})")
    p.add_argument("--reps", type=int, default=5, help="timed calls per measurement on CPU")
    p.add_argument("--steps", type=int, default=lossless.STEPS, help="symbols per lane stream (format field)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--model", action="store_true", help="decode-step latency of the default model instead")
    p.add_argument("--coded-dir", default=None, help="with --model: an existing compressed folder")
    p.add_argument("--dtype", default="float32", help="with --model: compute dtype")
    p.add_argument("--fixed4", action="store_true", help="CPU: the runtime layout's C kernels against F.linear")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in (args.shapes or (GPU_SHAPES if device == "cuda"
                                                                            else CPU_SHAPES)).split(",")]
    command = ["python", "benchmarks/bench_codec.py", *sys.argv[1:]]
    if args.fixed4:
        return main_fixed4(args)
    if args.model:
        res = bench_model(args.coded_dir, args.dtype, args.reps)
        if args.json:
            timing.write(timing.report([res], command), args.json)
        return
    name = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or platform.machine()} CPU"
    records = []
    for shape in shapes:
        r = bench_shape(shape, device, args.reps, args.steps)
        records.append(r)
        line = f"{shape[0]}x{shape[1]}: {r['bits_per_weight']:.2f} bits/w, decode {r['decode_GBps']:.3g} GB/s " \
               f"(dense copy {r['dense_copy_GBps']:.3g})"
        for b, row in r["batches"].items():
            line += f" | B={b} decode+mm {row['decode_matmul_vs_dense']:.2f}x"
            if "fused_vs_dense" in row:
                line += (f" fused {row['fused_vs_dense']:.2f}x "
                         f"({row['fused_s'] * 1e6:.0f} vs {row['dense_s'] * 1e6:.0f} us)")
        print(line, flush=True)
    if args.json:
        timing.write(timing.report(records, command, device=name, torch=torch.__version__,
                                   threads=torch.get_num_threads()), args.json)


if __name__ == "__main__":
    main()
