"""Sparse MLP step latency vs dense, per keep fraction, batch of one token (torch backend).

Paths: dense (three matmuls), gather (index_select of bundled rows + three contractions), routed (the
int4 router, top-k and the step), sketch (routed + the sketch prior), fused (the fused gather kernel,
Triton on CUDA). Ratios are against dense measured in the same run; absolute times are
meaningful only on a GPU. Also checks the Triton kernel against the numpy reference (--check).
    python benchmarks/bench_sparse.py --d 576 --n 1536 --dtype float32            # CPU, default model shape
    python benchmarks/bench_sparse.py --d 4096 --n 14336 --dtype bfloat16 --check  # H100
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from dn import backend as backends
from dn import sparse as ref
from dn import sparse_mlp
from dn.tolerances import KERNEL

be = backends.get("torch")

DT = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def timeit(fn, iters: int) -> float:
    """Median seconds per call over `iters` calls, after warm-up."""
    for _ in range(5):
        fn()
    cuda = torch.cuda.is_available()
    times = []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def random_layer(rng, d: int, n: int, keep: int, rank: int = 16) -> ref.LayerSparse:
    a = rng.standard_normal((d, rank)).astype(np.float32) / np.sqrt(d)
    b = rng.standard_normal((rank, 2 * n)).astype(np.float32)
    c = (0.01 * rng.standard_normal(n)).astype(np.float32)
    return ref.LayerSparse(keep, a, b, c, np.zeros(d, np.float32))


def check(dev: str) -> list[dict]:
    """Triton (and gather) vs the numpy reference on random weights, per dtype."""
    out = []
    rng = np.random.default_rng(0)
    for dtype in ("float32", "bfloat16"):
        for d, n in ((576, 1536), (256, 1000)):
            gate, up, down = (rng.standard_normal(s).astype(np.float32) * 0.05 for s in ((n, d), (n, d), (d, n)))
            layer = random_layer(rng, d, n, n // 3)
            layer.prior_y0 = (down @ layer.prior_c).astype(np.float32)
            bundled = ref.bundle(gate, up, down)
            mlp = be.make_sparse_mlp(bundled, layer, dtype, dev)
            x = rng.standard_normal((1, d)).astype(np.float32)
            xq = torch.as_tensor(x).to(DT[dtype]).float().numpy()
            bq = mlp.bundled.float().cpu().numpy()
            mask = sparse_mlp.route(x, mlp)
            want = ref.sparse_mlp_step(xq, bq, layer, mask)
            tol = KERNEL[dtype]
            fused = mlp.ops.fused_available(mlp.prior_c)
            for path in ("gather", "fused") if fused else ("gather",):
                got = sparse_mlp.step(x, mlp, path)
                err = float(np.abs(got - want).max() / (np.abs(want).max() + 1e-12))
                ok = bool(np.allclose(got, want, rtol=tol.rtol, atol=tol.atol * np.abs(want).max()))
                out.append({"dtype": dtype, "d": d, "n": n, "path": path, "rel_err": err, "ok": ok})
    return out


def bench(d: int, n: int, dtype: str, keeps: list[float], iters: int, dev: str) -> list[dict]:
    g = torch.Generator(device="cpu").manual_seed(0)
    dt = DT[dtype]
    gate, up = (torch.randn(n, d, generator=g) * 0.02 for _ in range(2))
    down = torch.randn(d, n, generator=g) * 0.02
    gate, up, down = (t.to(dev, dt) for t in (gate, up, down))
    bundled = torch.stack([gate, up, down.T], dim=1).contiguous()
    x = torch.randn(1, d, generator=g).to(dev, dt)
    f = torch.nn.functional

    def dense():
        return f.linear(f.silu(f.linear(x, gate)) * f.linear(x, up), down)

    t_dense = timeit(dense, iters)
    rows = [{"keep": 1.0, "path": "dense", "us": t_dense * 1e6, "ratio": 1.0}]
    qa, qs = ref.quantize_int4(torch.cat([gate, up]).float().cpu().numpy())
    pa, pb = ref.quantize_int4(down.float().cpu().numpy())
    for keep in keeps:
        k = max(1, round(keep * n))
        layer = ref.LayerSparse(k, np.zeros((d, 1), np.float32), np.zeros((1, 2 * n), np.float32),
                                np.zeros(n, np.float32), np.zeros(d, np.float32))
        b = bundled.float().cpu().numpy()
        mlp = be.make_sparse_mlp(b, layer, dtype, dev)
        idx = torch.randperm(n, generator=g)[:k].sort().values.to(dev)[None]
        routed = be.make_sparse_mlp(b, ref.LayerSparse(k, qa, qs, layer.prior_c, layer.prior_y0, "int4"), dtype, dev)
        sketched = be.make_sparse_mlp(b, ref.LayerSparse(k, qa, qs, layer.prior_c, layer.prior_y0, "int4",
                                                         "topk", None, pa, pb), dtype, dev)
        fns = {"gather": lambda m=mlp, i=idx: m._gather(x, i),
               "routed": lambda m=routed: m(x),      # int4 router (quantized matmul) + top-k + step
               "sketch": lambda m=sketched: m(x)}    # the same + the sketch prior (int4 down, quantized matmul)
        if mlp.ops.fused_available(x):
            fns["fused"] = lambda m=mlp, i=idx: m.ops.fused_step(x, m.bundled, i, m.prior_c, m.prior_y0)
        for path, fn in fns.items():
            t = timeit(fn, iters)
            rows.append({"keep": keep, "path": path, "us": t * 1e6, "ratio": t / t_dense})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--n", type=int, default=1536)
    p.add_argument("--dtype", default="float32", choices=list(DT))
    p.add_argument("--keeps", default="0.1,0.25,0.5,0.7,0.9")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--check", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    result = {"device": name, "d": args.d, "n": args.n, "dtype": args.dtype, "batch": 1,
              "command": " ".join(["python"] + sys.argv)}
    if args.check:
        result["check"] = check(dev)
    result["rows"] = bench(args.d, args.n, args.dtype, [float(k) for k in args.keeps.split(",")], args.iters, dev)
    for r in result["rows"]:
        print(f"keep {r['keep']:.2f} {r['path']:8s} {r['us']:9.1f} us  {r['ratio']:.2f}x dense")
    for c in result.get("check", []):
        print("check", c)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if all(c["ok"] for c in result.get("check", [])) else 1


if __name__ == "__main__":
    sys.exit(main())
