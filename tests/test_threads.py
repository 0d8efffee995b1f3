"""--threads N (dn.runtime.threads): a bad count is one line; a good one reaches torch, OpenMP's settings and the C
kernels' own pool (dn/formats/csrc/gguf.c), each seen in a fresh process, as a user runs dn."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_one_line_error, run_dn

from dn.runtime import threads


@pytest.mark.parametrize("verb,bad", [(v, "0") for v in ("generate", "chat", "eval", "parity", "footprint")]
                         + [("generate", b) for b in ("-1", "x", "1.5", "5000")])
def test_bad_threads_is_one_line(verb, bad):
    assert_one_line_error(run_dn(verb, "--threads", bad), "--threads")


def test_physical_cores_and_count(monkeypatch):
    assert 1 <= threads.physical_cores() <= (threads.os.cpu_count() or 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.count() == 3 and threads.count(5) == 5
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")
    assert threads.count() == threads.physical_cores()


# A fresh process: --threads parsed as a verb parses it, then torch, OpenMP's settings and the C pool looked at.
# The pool's workers are OS threads started on a kernel's first call with more than one thread: a matmul over
# enough weights for N threads starts N - 1 of them.
_PROBE = """
import json, os, sys
from dn import cli
p = cli.ArgumentParser()
cli.add_threads_arg(p)
n = p.parse_args(["--threads", sys.argv[1]]).threads
import numpy as np, torch
from dn.formats import gguf_blocks as gb
from dn_torch import gguf, kernels
raw = torch.from_numpy(np.random.default_rng(0).integers(0, 64, (2048, 2048 // 32 * 34), dtype=np.uint8))
x = torch.ones(1, 2048, dtype=torch.bfloat16)
tasks = lambda: len(os.listdir("/proc/self/task"))
before = tasks()
gguf.matmul(x, raw, "Q8_0")
print(json.dumps({"n": n, "torch": torch.get_num_threads(), "kernels": kernels.threads(2048 * 2048),
                  "omp_wait": os.environ.get("OMP_WAIT_POLICY"), "native": gb.native() is not None,
                  "new_threads": tasks() - before}))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc")
@pytest.mark.parametrize("n", [1, 2])
def test_threads_reach_torch_and_the_c_pool(n):
    pytest.importorskip("torch")
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(n)], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in threads.os.environ.items() if k != "OMP_WAIT_POLICY"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["n"] == seen["torch"] == seen["kernels"] == n
    if seen["native"]:
        assert seen["new_threads"] == n - 1


@pytest.mark.parametrize("load, want", [(1e6, "PASSIVE"), (0.0, None)])
def test_idle_threads_sleep_only_on_busy_cores(load, want):
    """Before torch loads OpenMP: PASSIVE where the 1-minute load is at least half the cores, else OpenMP's own
    spin-then-sleep (on idle cores it makes 2 threads decode at least as fast as one: bench_threads.py)."""
    code = (f"import os; os.getloadavg = lambda: ({load}, {load}, {load}); from dn.runtime import threads; "
            "threads.apply(2); import torch; print(os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in threads.os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(want)
    assert threads.busy(1.0, 2) and not threads.busy(0.9, 2) and threads.busy(4.0, 8) and not threads.busy(3.5, 8)


def test_user_wait_policy_is_kept():
    code = "from dn.runtime import threads; threads.apply(1); import os; print(os.environ['OMP_WAIT_POLICY'])"
    env = {**threads.os.environ, "OMP_WAIT_POLICY": "ACTIVE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.strip() == "ACTIVE"


def test_generate_says_its_threads(backend_name):
    """The stats line names the thread count torch ran on; on MLX, whose CPU threads dn does not set, none."""
    proc = run_dn("generate", "--backend", backend_name, "--threads", "1", "--raw", "-p", "Hi", "-m", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    stats = proc.stderr.strip().splitlines()[-1]
    if backend_name == "torch":
        assert ", 1 thread]" in stats
    else:
        assert "thread" not in stats
