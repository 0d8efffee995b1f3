"""Every GPU check of dn in one run, for a session that is lent a CUDA machine (docs/gpu.md): the GPU tests, the
Triton kernels' benchmarks against cuBLAS and dense, and `dn bench` on CUDA. Results go to $OUT as JSON (at most
8 files, the device tool's limit). On a machine without CUDA it prints one line and exits 0.

    python3 scripts/gpu_check.py [--steps tests,fixed4,sparse,bench_sparse,dnbench] [--quick] [--out DIR]

Each step runs in its own process under a time limit, so a crash or hang in one leaves the others' results; the
summary ($OUT/summary.json) is rewritten after every step. Wheels for what the machine lacks (gguf, platformdirs)
are installed from .whl/ when that folder exists (docs/gpu.md says how to fetch them).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("tests", "fixed4", "sparse", "bench_sparse", "dnbench")
LIMITS = {"tests": 170, "fixed4": 200, "sparse": 100, "bench_sparse": 60, "dnbench": 240}  # seconds; quick halves
FIXED4_SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))
SPARSE_SHAPE = (4096, 14336)  # d, n
BATCHES = (1, 4, 16)
DEVICE = "cuda"  # --dry: "cpu" under TRITON_INTERPRET=1 with tiny shapes, so this file's Python is tested without a GPU


def cuda_or_none() -> str | None:
    """Why there is nothing to run here, or None when CUDA is usable."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    return None


def install_wheels() -> str:
    """pip install --no-index the carried wheels in .whl/ into /tmp/dn-site (on PYTHONPATH for every step)."""
    whl = ROOT / ".whl"
    if not whl.is_dir() or not list(whl.glob("*.whl")):
        return "no .whl folder"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade",
           "--target", "/tmp/dn-site", *map(str, whl.glob("*.whl"))]
    r = subprocess.run(cmd, capture_output=True, text=True)
    return "installed " + ", ".join(p.name for p in whl.glob("*.whl")) if r.returncode == 0 else r.stderr[-500:]


def env() -> dict:
    path = os.pathsep.join([str(ROOT), "/tmp/dn-site", os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "TRITON_INTERPRET": "0"}


def run_step(name: str, cmd: list[str], limit: int, log) -> dict:
    """One step in its own process; its output goes to the shared log."""
    log.write(f"\n===== {name}: {' '.join(cmd)}\n")
    log.flush()
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env(), cwd=ROOT, start_new_session=True)
    try:
        rc = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:  # the whole group: pytest's own subprocesses too
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = "timeout"
    res = {"rc": rc, "seconds": round(time.time() - t0, 1), "limit_s": limit}
    log.write(f"===== {name}: {res}\n")
    log.flush()
    print(f"gpu_check: {name} {res}", flush=True)
    return res


# ---- the kernel benchmarks (run in a child: python3 scripts/gpu_check.py --child fixed4 JSON) -------------------

def gpu_times(fn) -> dict:
    """Median microseconds: GPU time from a CUDA graph of the call (launch overhead gone, as in a graph-captured
    decode loop) and eager (every call launched from Python)."""
    if DEVICE == "cpu":  # --dry: one call, to exercise the code
        t0 = time.perf_counter()
        fn()
        return {"graph_us": 1e6 * (time.perf_counter() - t0), "eager_us": 1e6 * (time.perf_counter() - t0)}
    from triton.testing import do_bench, do_bench_cudagraph

    return {"graph_us": 1e3 * do_bench_cudagraph(fn, rep=50, return_mode="median"),
            "eager_us": 1e3 * do_bench(fn, warmup=10, rep=50, return_mode="median")}


def fixed4_configs(batch: int, quick: bool) -> list[dict]:
    """Stage 1 of the tile sweep: the default tiles, then rows x columns per step (one split, 4 warps): fp32 FMAs
    with the [batch, rows, columns / 2] product tile at <= 8192 floats, and tensor-core tiles."""
    from dn_torch import _triton_codec as tk

    bp = 1 << (batch - 1).bit_length()
    out = [tk.fixed4_config(batch)]
    for bn in ((4, 8) if quick else (2, 4, 8, 16)):
        for bk in (256, 512, 1024):
            c = {"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": 1, "DOT": False}
            if bp * bn * bk // 2 <= 8192 and c not in out:
                out.append(c)
    # tensor cores (tf32, batch padded to 16): rows x columns per step
    for bn in ((32,) if quick else (16, 32, 64)):
        for bk in ((128,) if quick else (64, 128, 256)):
            out.append({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": 1, "DOT": True})
    return out


def refine(best: dict, quick: bool) -> list[dict]:
    """Stage 2: the best stage-1 tiles with split-K and 8 warps."""
    if quick:
        return [best | {"SPLIT_K": 2}]
    return [best | {"SPLIT_K": sk, "num_warps": w} for sk in (1, 2, 4) for w in (4, 8) if (sk, w) != (1, 4)]


def fixed4_run(t, x, ref, dense: dict, cfg: dict) -> dict:
    """One tile configuration: its error against the float32 product and its times."""
    from dn_torch import _triton_codec as tk

    try:
        y = tk.fixed4_matvec(t, x, cfg).float()
        tm = gpu_times(lambda: tk.fixed4_matvec(t, x, cfg))
    except Exception as e:  # a tile the compiler refuses: recorded, the sweep goes on
        return {"config": cfg, "error": repr(e)[:300]}
    return {"config": cfg, "max_rel_err": float((y - ref).abs().max() / ref.abs().max()), **tm,
            "speed_vs_bf16_gemv_graph": dense["graph_us"] / tm["graph_us"]}


def fixed4_batch(t, w, shape, b: int, sweep_tiles: dict | None, quick: bool) -> dict:
    """Batch b on one shape: cuBLAS, the fused kernel (a two-stage tile sweep when sweep_tiles is None, else the
    default tiles and sweep_tiles), decode-then-GEMV."""
    import torch

    from dn_torch import _triton_codec as tk

    x = torch.randn(b, shape[1], device=DEVICE).to(torch.bfloat16)
    ref = x.float() @ w.float().T
    dense = gpu_times(lambda: torch.nn.functional.linear(x, w))
    configs = fixed4_configs(b, quick) if sweep_tiles is None else [tk.fixed4_config(b), sweep_tiles]
    runs = [fixed4_run(t, x, ref, dense, c) for i, c in enumerate(configs) if c not in configs[:i]]

    def good():
        return [r for r in runs if "graph_us" in r and r["max_rel_err"] < 2e-2]

    if sweep_tiles is None and good():
        runs += [fixed4_run(t, x, ref, dense, c) for c in refine(min(good(), key=lambda r: r["graph_us"])["config"],
                                                                 quick)]
    scratch = torch.empty(shape, dtype=torch.bfloat16, device=DEVICE)
    then = gpu_times(lambda: torch.nn.functional.linear(x, tk.fixed4_decode(t, scratch.view(-1)).view(shape)))
    best = min(good(), key=lambda r: r["graph_us"]) if good() else None
    if best:
        print(f"fixed4 {shape} B={b}: dense {dense['graph_us']:.1f} us, fused {best['graph_us']:.1f} us "
              f"({best['speed_vs_bf16_gemv_graph']:.2f}x bf16 GEMV speed) {best['config']}", flush=True)
    return {"dense_us": dense, "sweep": runs, "decode_then_gemv_us": then, "best": best}


def bench_fixed4(path: str, quick: bool) -> None:
    """fixed4: decode bit-exactness and GB/s; fused decode+GEMV vs cuBLAS bf16 GEMV at batch 1/4/16 (tile sweep
    on the first shape, its best tiles per batch then on the others); decode-then-GEMV for comparison."""
    import types

    import numpy as np
    import torch

    from dn.formats import fixed4
    from dn.runtime import timing as benchmark
    from dn_torch import _triton_codec as tk

    records, best = [], {}
    for shape in FIXED4_SHAPES:
        w = (torch.randn(shape, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0)) * 0.02)
        w = w.to(torch.bfloat16)
        rt = fixed4.from_bits(w.view(torch.int16).cpu().numpy().view(np.uint16), "bfloat16")
        fields = ("table", "nibbles", "raw", "esc_index", "esc_symbol")
        t = types.SimpleNamespace(dtype="bfloat16", shape=shape,
                                  **{k: torch.from_numpy(getattr(rt, k)).to(DEVICE) for k in fields})
        scratch = torch.empty(rt.n, dtype=torch.bfloat16, device=DEVICE)
        exact = bool(torch.equal(tk.fixed4_decode(t, scratch).view(torch.int16), w.view(-1).view(torch.int16)))
        dec = gpu_times(lambda: tk.fixed4_decode(t, scratch))  # noqa: B023
        copy = gpu_times(lambda: scratch.copy_(w.view(-1)))  # noqa: B023
        rec = {"shape": list(shape), "bits_per_weight": rt.bits_per_weight(), "escapes": int(rt.esc_index.size),
               "decode_bit_exact": exact, "decode_us": dec, "copy_us": copy,
               "decode_GBps_bf16_out": 2 * rt.n / dec["graph_us"] / 1e3, "batches": {}}
        records.append(rec)
        for b in BATCHES:
            row = fixed4_batch(t, w, shape, b, best.get(b) if len(records) > 1 else None, quick)
            if len(records) == 1 and row["best"]:
                best[b] = row["best"]["config"]
            rec["batches"][str(b)] = row
            # rewritten after every batch: a step stopped at its time limit keeps what it measured
            benchmark.write(benchmark.report(records, target="fused decode+GEMV >= 1.0x bf16 GEMV speed at batch 1",
                                             device=device_name(), best_configs={str(k): v for k, v in best.items()}),
                            path)


def bench_sparse_kernel(path: str, quick: bool) -> None:
    """The fused sparse kernel at 4096x14336 bf16, one token, against the dense MLP (three cuBLAS GEMVs + silu*up):
    a block sweep at keep 50%, then the keep sweep with the best blocks; every run checked against torch fp32."""
    import torch
    import torch.nn.functional as F

    from dn.runtime import timing as benchmark
    from dn_torch import kernels as ts

    d, n = SPARSE_SHAPE
    g = torch.Generator(DEVICE).manual_seed(0)
    gate, up = (torch.randn(n, d, device=DEVICE, generator=g) * 0.02 for _ in range(2))
    down = torch.randn(d, n, device=DEVICE, generator=g) * 0.02
    gate, up, down = (a.to(torch.bfloat16) for a in (gate, up, down))
    bundled = torch.stack([gate, up, down.T], dim=1).contiguous()
    x = torch.randn(1, d, device=DEVICE, generator=g).to(torch.bfloat16)
    c = torch.zeros(n, device=DEVICE, dtype=torch.bfloat16)
    y0 = torch.zeros(d, device=DEVICE, dtype=torch.bfloat16)
    dense = gpu_times(lambda: F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down))

    def one(keep: float, bk: int, bd: int, split: int) -> dict:
        idx = torch.randperm(n, device=DEVICE, generator=g)[:max(1, round(keep * n))].sort().values
        xf, bf = x.float(), bundled[idx].float()
        want = (F.silu(bf[:, 0] @ xf[0]) * (bf[:, 1] @ xf[0])) @ bf[:, 2]
        got = ts.triton_step(x, bundled, idx, c, y0, block_k=bk, block_d=bd, split=split).float()[0]
        tm = gpu_times(lambda: ts.triton_step(x, bundled, idx, c, y0, block_k=bk, block_d=bd, split=split))
        return {"keep": keep, "block_k": bk, "block_d": bd, "split": split, **tm,
                "vs_dense_graph": tm["graph_us"] / dense["graph_us"],
                "max_rel_err": float((got - want).abs().max() / want.abs().max())}

    # one kernel (split 0: atomics per neuron block) and the split design (activations, then down rows with each
    # column's sum split s ways)
    grid = [(bk, bd, 0) for bk in ((16, 64) if quick else (8, 16, 32, 64)) for bd in ((256,) if quick else (128, 256,
                                                                                                           512))]
    grid += [(bk, bd, s) for s in ((8,) if quick else (4, 8, 16)) for bk in (16, 32) for bd in (64, 128)]
    sweep = []
    for bk, bd, split in grid:
        try:
            sweep.append(one(0.5, bk, bd, split))
        except Exception as e:
            sweep.append({"keep": 0.5, "block_k": bk, "block_d": bd, "split": split, "error": repr(e)[:300]})
    def save(keeps):
        rec = {"d": d, "n": n, "dtype": "bfloat16", "dense_us": dense, "block_sweep": sweep, "keep_sweep": keeps}
        target = "keep 50% <= 0.55x dense latency; never slower than dense at keep <= 90%"
        benchmark.write(benchmark.report([rec], target=target, device=device_name()), path)

    save([])  # the sweep kept if the keep sweep runs out of time
    ok = [s for s in sweep if "graph_us" in s and s["max_rel_err"] < 2e-2]
    bk, bd, split = (min(ok, key=lambda s: s["graph_us"])[k] for k in ("block_k", "block_d", "split")) if ok else (
        16, 256, 0)
    keeps = [one(k, bk, bd, split) for k in (0.1, 0.25, 0.5, 0.7, 0.9)]
    for r in keeps:
        print(f"sparse fused keep {r['keep']:.2f}: {r['graph_us']:.1f} us, {r['vs_dense_graph']:.2f}x dense "
              f"({dense['graph_us']:.1f} us), blocks {bk}x{bd} split {split}", flush=True)
    save(keeps)


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (--dry: Triton interpreter, tiny shapes)"


def main(argv=None) -> int:
    global DEVICE, FIXED4_SHAPES, SPARSE_SHAPE, BATCHES

    p = argparse.ArgumentParser()
    p.add_argument("--steps", default=",".join(STEPS), help=f"some of {','.join(STEPS)}")
    p.add_argument("--quick", action="store_true", help="smaller sweeps, halved time limits")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "gpu_out"))
    p.add_argument("--budget", type=int, default=570, help="seconds for all steps (the device tool allows 600)")
    p.add_argument("--child", nargs=2, metavar=("STEP", "JSON"), help=argparse.SUPPRESS)
    p.add_argument("--dry", action="store_true", help=argparse.SUPPRESS)  # with --child, under TRITON_INTERPRET=1
    args = p.parse_args(argv)
    if args.child:
        if args.dry:
            DEVICE, FIXED4_SHAPES, SPARSE_SHAPE, BATCHES = "cpu", ((24, 64), (10, 66)), (64, 96), (1, 3)
        {"fixed4": bench_fixed4, "sparse": bench_sparse_kernel}[args.child[0]](args.child[1], args.quick)
        return 0
    why = cuda_or_none()
    if why:
        print(f"gpu_check: no CUDA device here ({why}); nothing run")
        return 0
    steps = [s for s in args.steps.split(",") if s]
    bad = [s for s in steps if s not in STEPS]
    if bad:
        print(f"gpu_check: unknown step(s) {', '.join(bad)} (choose from {', '.join(STEPS)})", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    summary = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": sys.version.split()[0],
               "wheels": install_wheels(), "steps": {}}
    try:
        import triton

        summary["triton"] = triton.__version__
    except ImportError:
        summary["triton"] = None
    cmds = commands(sys.executable, out, args.quick)
    end = time.time() + args.budget
    with open(out / "gpu_check.log", "w") as log:
        for s in steps:
            left = int(end - time.time())
            if isinstance(cmds[s], str):
                summary["steps"][s] = {"rc": "skipped", "why": cmds[s]}
            elif left < 30:
                summary["steps"][s] = {"rc": "skipped", "why": f"--budget spent ({left} s left)"}
            else:
                limit = LIMITS[s] // 2 if args.quick else LIMITS[s]
                summary["steps"][s] = run_step(s, cmds[s], min(limit, left), log)
            (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    failed = [s for s, r in summary["steps"].items() if r["rc"] not in (0, "skipped")]
    print(f"gpu_check: done, results in {out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def commands(py: str, out: Path, quick: bool) -> dict:
    """Each step's command line, or a string saying why it cannot run here."""
    q = ["--quick"] if quick else []
    return {
        # the gpu-marked tests (fixed4 and sparse Triton kernels, the runtime's CUDA hook), the CUDA tests of the
        # Huffman kernels and of the sparse MLP's hardware path (skip-if-no-CUDA, not marked), and the compressed
        # tiny model's logits against dense (on CUDA where torch finds it); not the interpreter tests
        "tests": [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_triton_fixed4.py",
                  "tests/test_triton_sparse.py", "tests/test_codec_torch.py", "tests/test_sparse.py",
                  "tests/test_codec.py", "-k", "(cuda or triton_decode or fused_matvec or hardware or "
                  "logits_are_bit_identical or runtime_logits) and not interpreter", "--junitxml",
                  str(out / "pytest.xml")],
        "fixed4": [py, __file__, *q, "--child", "fixed4", str(out / "fixed4.json")],
        "sparse": [py, __file__, *q, "--child", "sparse", str(out / "sparse_kernel.json")],
        "bench_sparse": [py, "benchmarks/bench_sparse.py", "--d", "4096", "--n", "14336", "--dtype", "bfloat16",
                         "--check", "--keeps", "0.1,0.25,0.5,0.7,0.9", "--reps", "20", "--json",
                         str(out / "bench_sparse.json")],
        "dnbench": dnbench_cmd(py, out),
    }


def dnbench_cmd(py: str, out: Path) -> list[str] | str:
    """dn bench on the default model (or DN_MODEL) on CUDA, when it and the texts are on this machine; else why
    not."""
    model = os.environ.get("DN_MODEL")
    if not model:
        code = "from dn.model.sources import resolve_model as r; print(r(None, progress=False))"
        r = subprocess.run([py, "-c", code],
                           capture_output=True, text=True, env=env(), cwd=ROOT)
        if r.returncode:
            return "no default model here: set DN_MODEL (docs/gpu.md)"
        model = r.stdout.strip().splitlines()[-1]
    text = os.environ.get("DN_EVAL_TEXT", str(ROOT / ".gpu_data" / "eval.txt"))
    calib = os.environ.get("DN_CALIB_TEXT", str(ROOT / ".gpu_data" / "calib.txt"))
    missing = [f for f in (text, calib) if not Path(f).is_file()]
    if missing:
        return f"no text file {', '.join(missing)}: set DN_EVAL_TEXT / DN_CALIB_TEXT (docs/gpu.md)"
    return [py, "-m", "dn.cli", "bench", "--model", model, "--text", text, "--calib-text", calib, "--configs",
            "dense,lossless,sparse50", "--backends", "torch", "--dtypes", "bfloat16", "--batch", "1,4",
            "--max-tokens", "1024", "--json", str(out / "dnbench.json")]


if __name__ == "__main__":
    sys.exit(main())
