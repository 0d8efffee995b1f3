"""scripts/gpu_check.py, the one-run GPU check (docs/gpu.md): it skips cleanly without CUDA, and its benchmark code
runs (in Triton's interpreter, tiny shapes) so a lent GPU's minutes are not lost to a Python error."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def run(*args, interpret=False):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_skips_in_one_line_without_cuda(tmp_path):
    r = run("--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1 and r.stdout.startswith("gpu_check: no CUDA device here"), r.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton not installed")
@pytest.mark.parametrize("step", ["fixed4", "sparse"])
def test_benchmark_children_run_dry(tmp_path, step):
    out = tmp_path / f"{step}.json"
    r = run("--quick", "--dry", "--child", step, str(out), interpret=True)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    rec = json.loads(out.read_text())["records"][0]
    if step == "fixed4":
        assert rec["decode_bit_exact"]
        runs = [s for b in rec["batches"].values() for s in b["sweep"]]
    else:
        runs = rec["block_sweep"] + rec["keep_sweep"]
    assert runs and all("error" not in s and s["max_rel_err"] < 2e-2 for s in runs), runs


def test_step_commands_are_current(tmp_path):
    """The commands the script runs still match their programs: bench_sparse's flags (run here at a tiny size) and
    the tests step's selection (the CUDA tests, none of the interpreter ones)."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    cmds = gpu_check.commands(sys.executable, tmp_path, quick=True)
    bench = cmds["bench_sparse"]
    bench[bench.index("--d") + 1], bench[bench.index("--n") + 1] = "64", "128"
    bench[bench.index("--reps") + 1] = "2"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(bench, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert json.loads((tmp_path / "bench_sparse.json").read_text())
    tests = cmds["tests"]
    r = subprocess.run([*tests[:tests.index("--junitxml")], "--collect-only"], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=300)
    selected = [line for line in r.stdout.splitlines() if "::" in line]
    assert r.returncode == 0 and selected, r.stdout[-3000:]
    assert not any("interpreter" in t for t in selected)
    for name in ("test_fixed4_large_layers_cuda", "test_sparse_kernel_cuda", "test_fused_matvec_matches_dense",
                 "test_triton_decode_large_pack_bit_exact", "test_hardware_kernel_matches_reference",
                 "test_fixed4_runtime_hook_cuda", "test_compressed_model_logits_are_bit_identical",
                 "test_fixed4_runtime_logits_bit_identical"):
        assert any(name in t for t in selected), name
