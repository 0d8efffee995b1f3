"""The lossless runtime layout fixed4 on MLX, on MLX's default device: the pure-MLX decode (GB/s of 16-bit
output) and one projection y = x W^T at batch 1, 4 and 16: the bf16 dense GEMV, decode then matmul (the
bit-identical path), and on a GPU (Metal or CUDA) the fused decode+GEMV kernel; ratios against dense from the
same run. Weights are N(0, 0.02) rounded to bf16 (the exponent spread of trained layers); a shape is [out, in].

    python benchmarks/bench_fixed4_mlx.py [--shapes 1536x576,576x1536] [--reps 20] [--json OUT]
    DN_MLX_DEVICE=gpu python benchmarks/bench_fixed4_mlx.py --json OUT   # Metal / CUDA: GPU shapes by default
    python benchmarks/bench_fixed4_mlx.py --model [--coded-dir DIR] [--dtype bfloat16] [--json OUT]

--model: one decode step (batch 1, after a 32-token prompt) of the default model, dense and converted with
`--codec lossless`, through dn_mlx.model only (so it also times an older tree: PYTHONPATH=<that tree>).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from dn.formats import fixed4
from dn.model.sources import resolve_model
from dn.model.spec import load_spec
from dn.runtime import timing
from dn.runtime.writer import convert
from dn_mlx import codec as mc
from dn_mlx import model as m

GPU_SHAPES = "4096x4096,14336x4096,4096x14336"
CPU_SHAPES = "1536x576,576x1536"


def run(fn):
    return lambda: mx.eval(fn())


def bench_shape(shape: tuple[int, int], reps: int, gpu: str | None) -> list[dict]:
    rng = np.random.default_rng(0)
    vals = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    bits = (vals.view(np.uint32) >> 16).astype(np.uint16)
    rt = fixed4.from_bits(bits, "bfloat16")
    f = mc.Fixed4(rt, fused=gpu is not None)
    w = mx.array(bits).view(mx.bfloat16)
    mx.eval(f.parameters(), w)
    assert np.array_equal(np.array(mc.decode_fixed4(f)), bits)
    n = rt.n
    dec = timing.timer(run(lambda: mc._decode_fixed4(f)), reps)
    copy = timing.timer(run(lambda: w + 0), reps)
    common = {"shape": list(shape), "bits_per_weight": rt.bits_per_weight(), "escapes": int(rt.esc_index.size),
              "device": str(mx.default_device()), "gpu_kernel": gpu}
    decode = {"what": "decode", "decode_s": dec["median_s"], "decode_gb_s": 2 * n / dec["median_s"] / 1e9,
              "dense_copy_gb_s": 4 * n / copy["median_s"] / 1e9}
    return [common | decode] + [common | bench_batch(f, rt, w, b, reps, gpu, rng) for b in (1, 4, 16)]


def bench_batch(f: mc.Fixed4, rt, w: mx.array, b: int, reps: int, gpu: str | None, rng) -> dict:
    """y = x W^T for x [b, in] bf16: dense, decode then matmul, fused (GPU)."""
    x = mx.array(rng.standard_normal((b, rt.shape[1])).astype(np.float32)).astype(mx.bfloat16)
    dense = timing.timer(run(lambda: x @ w.T), reps)["median_s"]
    dm = timing.timer(run(lambda: x @ mc._weight(mc._decode_fixed4(f), "bfloat16", mx.bfloat16)
                             .reshape(rt.shape).T), reps)["median_s"]
    row = {"what": "matvec", "batch": b, "dense_s": dense, "decode_matmul_s": dm, "decode_matmul_vs_dense": dm / dense}
    if gpu is not None:
        fused = timing.timer(run(lambda: mc.matvec_fixed4(f, x)), reps)["median_s"]
        y = np.array(mc.matvec_fixed4(f, x).astype(mx.float32))
        ref = fixed4.matvec(rt, np.array(x.astype(mx.float32)))
        row |= {"fused_s": fused, "fused_vs_dense": fused / dense, "speed_vs_dense": dense / fused,
                "fused_max_rel_err": float(np.abs(y - ref).max() / np.abs(ref).max())}
    return row


def bench_model(coded_dir: str | None, dtype: str, reps: int, prompt: int = 32) -> list[dict]:
    dense_dir = resolve_model(None)
    if coded_dir is None:
        coded_dir = tempfile.mkdtemp(prefix="dn-fixed4-")
        convert(Path(dense_dir), Path(coded_dir), "lossless", None)
    tokens = np.random.default_rng(0).integers(0, 10000, size=(1, prompt + reps + 4))
    out = {}
    for name, folder in (("dense", dense_dir), ("lossless", coded_dir)):
        model = m.load(folder, load_spec(folder), dtype)
        cache = m.make_cache(model)
        m.logits(model, tokens[:, :prompt], cache)
        pos = iter(range(prompt, tokens.shape[1]))

        def step(model=model, cache=cache, pos=pos):
            i = next(pos)
            return m.logits(model, tokens[:, i:i + 1], cache)  # numpy: evaluated

        out[name] = timing.timer(step, reps, warmup=2)["median_s"]
        del model, cache
    return [{"what": "model_decode_step", "model": str(dense_dir), "dtype": dtype, "batch": 1, "prompt": prompt,
             "device": str(mx.default_device()), "dense_step_s": out["dense"], "lossless_step_s": out["lossless"],
             "speed_vs_dense": out["dense"] / out["lossless"]}]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=None, help=f"OUTxIN,... (default: GPU {GPU_SHAPES}; CPU {CPU_SHAPES})")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", default=None)
    ap.add_argument("--model", action="store_true", help="time a decode step of the default model instead")
    ap.add_argument("--coded-dir", default=None, help="--model: the default model converted --codec lossless")
    ap.add_argument("--dtype", default="bfloat16", help="--model: compute dtype")
    args = ap.parse_args(argv)
    if args.model:
        records = bench_model(args.coded_dir, args.dtype, args.reps)
        print(records[0])
        if args.json:
            timing.write(timing.report(records), args.json)
        return
    gpu = mc._gpu()
    shapes = args.shapes or (GPU_SHAPES if gpu else CPU_SHAPES)
    records = []
    for s in shapes.split(","):
        rows = bench_shape(tuple(int(v) for v in s.split("x")), args.reps, gpu)
        for r in rows:
            print({k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()})
        records += rows
    if args.json:
        timing.write(timing.report(records), args.json)


if __name__ == "__main__":
    main()
