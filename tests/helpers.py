"""Test helpers: the real `dn` entry point in a subprocess, as a user would run it; the C kernels' rule in CI."""

import os
import subprocess
import sys

import pytest

from dn.formats import native


def run_dn(*args, env=None, timeout=600):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "dn.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def assert_one_line_error(proc, needle):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0] and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def assert_runs_in_triton_interpreter(script, timeout=600):
    """Run a test script in a fresh process with TRITON_INTERPRET=1 (read at import) and the repo on the path;
    it must exit 0 and print "ok"."""
    from pathlib import Path

    path = os.pathsep.join([str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "ok" in proc.stdout


def require_native_in_ci(environ=os.environ):
    """The C kernels' rule in CI: under CI=true (GitHub Actions sets it; .ci/run and nox pass it on) the suite runs
    with DN_REQUIRE_NATIVE=1 unless it is set already, so a kernel that fails to build, its AVX-512 fast path
    included, raises (dn.formats.native.build) and its tests fail instead of skipping. conftest.py applies it to
    os.environ, so `dn` subprocesses inherit it."""
    if environ.get("CI", "").lower() in ("true", "1"):
        environ.setdefault("DN_REQUIRE_NATIVE", "1")


def native_or_skip(load):
    """A C kernel library from load() (dn.formats.native's build), or a skip where it cannot exist: DN_NATIVE=0, or
    no C compiler (none, or none that builds with the native flags: the reason says which). The plain paths run,
    and are tested, instead. A kernel that fails to build where the compiler works fails here, CI or not."""
    lib = load()  # raises under DN_REQUIRE_NATIVE=1 when the kernel does not build
    if lib is None:
        if not native.enabled():
            pytest.skip("DN_NATIVE=0: the plain paths are tested instead")
        problem = native.toolchain_problem()
        if problem is not None:
            pytest.skip(f"{problem}: the plain paths are tested instead")
        pytest.fail("a C kernel failed to build with a working compiler (its error is on stderr)")
    return lib
