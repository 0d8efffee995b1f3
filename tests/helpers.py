"""Running the real `dn` entry point in a subprocess, as a user would."""

import os
import subprocess
import sys


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


def native_or_skip(load):
    """A C kernel library from load() (dn.formats.native's build), or skip: no C compiler, or DN_NATIVE=0 (the plain
    paths
    run, and are tested, instead)."""
    import pytest

    lib = load()
    if lib is None:
        pytest.skip("no C compiler (or DN_NATIVE=0): the plain paths are tested instead")
    return lib
