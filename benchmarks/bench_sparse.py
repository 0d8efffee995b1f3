"""Sparse MLP step latency vs dense, per keep fraction, batch of one token (torch backend).

Paths, each against torch's dense MLP (three F.linear at the same dtype) timed in the same run:
  gather   the plain path on given kept rows: index_select of bundled rows + three contractions
  native   the C kernel (dn/formats/csrc/sparse.c) on the same kept neurons, read in place from the bundles
  router   the int4 router alone (estimate through torch's packed int4 kernel + selection): its cost
  routed   the whole step: int4 router, top-k, the kept neurons (auto path: native on CPU), prior none
  sketch   routed + the sketch prior (int4 down through the same packed kernel)
  router-gate, routed-gate   the same with the int4gate router (an int4 sketch of the gate alone)
  fused    the Triton kernel on the given kept rows (CUDA)
  planes-router, planes, planes-sketch   router "planes" (dn/formats/planes.py) through dn/formats/csrc/planes.c
  (CPU, bf16):
           the router alone (every neuron skipped, no prior), the whole step with threshold selection set to keep
           that fraction of this token's neurons (the top scores, not a random set), and the same with the
           sketch prior
Ratios are against dense timed in the same run before and after each keep's paths, the faster of the two;
absolute times are meaningful only on the machine recorded.
Also checks the kernels against the numpy reference (--check). Timer and JSON: dn/runtime/timing.py.
    python benchmarks/bench_sparse.py --d 4096 --n 14336 --dtype bfloat16 --threads 1 --reps 7 \
        --json docs/results/bench-sparse-cpu-4096x14336.json                             # CPU, Llama-3-8B MLP
    python benchmarks/bench_sparse.py --d 576 --n 1536 --dtype bfloat16 --threads 1     # default model shape
    python benchmarks/bench_sparse.py --d 4096 --n 14336 --dtype bfloat16 --check      # GPU
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from dn.core.tolerances import KERNEL
from dn.formats import planes
from dn.formats import sparse as ref
from dn.runtime import backend as backends
from dn.runtime import sparse_mlp, timing
from dn_torch import sparse as ts

be = backends.get("torch")

DT = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def timeit(fn, reps: int, dev: str) -> float:
    """Median seconds per call after 3 warm-up calls (dn.runtime.timing.timer; CUDA synchronized)."""
    return timing.timer(fn, reps=reps, warmup=3, sync=torch.cuda.synchronize if dev == "cuda" else None)["median_s"]


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
            paths = ["gather"] + ["fused"] * mlp.ops.fused_available(mlp.prior_c) + [
                "native"] * mlp.ops.native_available(mlp.prior_c, mlp.bundled)
            for path in paths:
                got = sparse_mlp.step(x, mlp, path)
                err = float(np.abs(got - want).max() / (np.abs(want).max() + 1e-12))
                ok = bool(np.allclose(got, want, rtol=tol.rtol, atol=tol.atol * np.abs(want).max()))
                out.append({"dtype": dtype, "d": d, "n": n, "path": path, "rel_err": err, "ok": ok})
    return out


def bench(d: int, n: int, dtype: str, keeps: list[float], reps: int, dev: str, skip: tuple = ()) -> list[dict]:
    g = torch.Generator(device="cpu").manual_seed(0)
    dt = DT[dtype]
    gate, up = (torch.randn(n, d, generator=g) * 0.02 for _ in range(2))
    down = torch.randn(d, n, generator=g) * 0.02
    qa, qs = ref.quantize_int4(torch.cat([gate, up]).numpy())      # the int4 router of [G; U]
    ga, gs = qa[:n], qs[:n]                                         # int4gate: G's rows of it
    pa, pb = ref.quantize_int4(down.numpy())                        # the sketch prior of D
    gate, up, down = (t.to(dev, dt) for t in (gate, up, down))
    bundled = torch.stack([gate, up, down.T], dim=1).contiguous()   # the layout SparseMLP computes on
    x = torch.randn(1, d, generator=g).to(dev, dt)
    f = torch.nn.functional

    def dense():
        return f.linear(f.silu(f.linear(x, gate)) * f.linear(x, up), down)

    zero_c, zero_y0 = np.zeros(n, np.float32), np.zeros(d, np.float32)
    routed = ts.SparseMLP(bundled, ref.LayerSparse(n, qa, qs, zero_c, zero_y0, "int4", "topk"))   # no copy
    sketched = ts.SparseMLP(bundled, ref.LayerSparse(n, qa, qs, zero_c, zero_y0, "int4", "topk", None, pa, pb))
    gated = ts.SparseMLP(bundled, ref.LayerSparse(n, ga, gs, zero_c, zero_y0, "int4gate", "topk"))
    native = routed.ops.native_available(x, bundled)
    fused = routed.ops.fused_available(x)
    split = routed.ops.planes_native(x)
    if split:  # router "planes": the weights' own sketches route
        bits = routed.ops.bits16(bundled)
        parts = [planes.split(np.ascontiguousarray(bits[:, i])) for i in range(3)]
        ra, rb, _ = planes.stack(parts[:2])
        by_planes = {}
        for prior in ("none", "sketch"):
            pa, pb = (parts[2][0], parts[2][1][None]) if prior == "sketch" else (None, None)
            layer = ref.LayerSparse(n, ra, rb, zero_c, zero_y0, "planes", "threshold", np.zeros(n, np.float32), pa, pb)
            by_planes[prior] = ts.SparseMLP(bundled, layer)
        never = torch.full((n,), np.inf)  # thresholds no neuron passes: the router's pass alone
        est = ref.scores(x.float().cpu().numpy(), layer)[0]  # this token's router scores
    rows = []
    with torch.inference_mode():
        for keep in keeps:
            k = max(1, round(keep * n))
            routed.keep = sketched.keep = gated.keep = k
            idx = torch.randperm(n, generator=g)[:k].sort().values.to(dev)[None]
            mask = torch.zeros(1, n, dtype=torch.bool, device=dev)
            mask[0, idx[0]] = True
            fns = {"dense": dense,
                   "gather": lambda i=idx: routed._gather(x, i),
                   "router": lambda: routed.route(x),
                   "routed": lambda: routed(x),
                   "sketch": lambda: sketched(x),
                   "router-gate": lambda: gated.route(x),
                   "routed-gate": lambda: gated(x)}
            if native:
                fns["native"] = lambda m=mask: routed.ops.native_step(x, bundled, m, routed.prior_c,
                                                                      routed.prior_y0, "silu")
            if fused:
                fns["fused"] = lambda i=idx: routed.ops.fused_step(x, bundled, i, routed.prior_c, routed.prior_y0)
            if split:
                cut = np.sort(est)[::-1][k - 1] if k < n else -1.0  # this token keeps its k best-scored neurons
                for mlp in by_planes.values():
                    mlp.thresh.fill_(float(np.nextafter(np.float32(cut), np.float32(-1))))
                fns |= {"planes-router": lambda m=by_planes["none"]: m.ops.planes_step(
                            x, m._mats(), never, m.planes.c32, m.prior_y0, "silu", False),
                        "planes": lambda: by_planes["none"](x), "planes-sketch": lambda: by_planes["sketch"](x)}
            fns = {p: fn for p, fn in fns.items()  # the routers' work does not depend on keep
                   if p not in skip and not ("router" in p and keep != keeps[0])}
            # each path timed on its own after warm-up calls (not interleaved: here a kernel's first calls after
            # another one's run slow, dense up to 1.5x); dense before and after each keep's paths, the faster of
            # the two the baseline (a shared machine drifts; the faster is the stricter for dn)
            dense_fn = fns.pop("dense")
            t_first = timeit(dense_fn, reps, dev)
            got = {path: timeit(fn, reps, dev) for path, fn in fns.items()}
            t_dense = min(t_first, timeit(dense_fn, reps, dev))
            for path, t in ({"dense": t_dense} | got).items():
                rows.append({"keep": keep, "path": path, "us": t * 1e6, "ratio": t / t_dense})
                show(rows[-1])
    return rows


def show(r: dict) -> None:
    print(f"keep {r['keep']:.2f} {r['path']:11s} {r['us']:10.1f} us  {r['ratio']:.3f}x dense", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--n", type=int, default=1536)
    p.add_argument("--dtype", default="bfloat16", choices=list(DT))
    p.add_argument("--keeps", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="torch (and the C kernel's OpenMP) threads")
    p.add_argument("--skip", default="", help="paths not to time (comma-separated), e.g. gather: its copy of the "
                                              "kept rows takes seconds per call at 4096x14336 on a busy CPU")
    p.add_argument("--check", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    extra = {"device": name, "d": args.d, "n": args.n, "dtype": args.dtype, "batch": 1,
             "threads": torch.get_num_threads()}
    check_rows = check(dev) if args.check else []
    rows = bench(args.d, args.n, args.dtype, [float(k) for k in args.keeps.split(",")], args.reps, dev,
                 tuple(args.skip.split(",")))
    for c in check_rows:
        print("check", c)
    if args.json:
        timing.write(timing.report(rows, ["python"] + sys.argv, **extra, check=check_rows), args.json)
    return 0 if all(c["ok"] for c in check_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
