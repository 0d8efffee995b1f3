"""CPU kernels written in C (dn/formats/csrc/<name>.c), built once per machine with the system compiler and called
through ctypes on numpy/torch memory. Backend-neutral: a kernel takes raw pointers and sizes, nothing else.

Built into <cache>/native/<name>-<key>.so, the key hashing the source, the flags, the compiler and this CPU's
flags (the build uses -march=native); a temporary file then a rename, so racing builds are harmless.
`DN_NATIVE=0` turns every kernel off (the plain paths run); without a compiler, or when the build fails (a
compiler without OpenMP, say), `library()` returns None, the latter after one line on stderr.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

from dn.core.errors import DnError

SRC = Path(__file__).parent / "csrc"
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fopenmp", "-std=c11")


def enabled() -> bool:
    return os.environ.get("DN_NATIVE", "1") != "0"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


@cache
def _build(name: str) -> ctypes.CDLL | None:
    cc = _compiler()
    src = SRC / f"{name}.c"
    if cc is None:
        return None
    if not src.exists():
        raise DnError(f"no native kernel source {src}")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    headers = [h.read_text() for h in sorted(SRC.glob("*.h"))]  # what the sources include
    key = hashlib.sha256("\0".join([src.read_text(), *headers, " ".join(FLAGS), version, platform.machine(),
                                    _cpu_flags()]).encode()).hexdigest()[:16]
    from dn.model.sources import cache_dir

    out = cache_dir() / "native" / f"{name}-{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            r = subprocess.run([cc, *FLAGS, str(src), "-o", tmp, "-lm"], capture_output=True, text=True)
            if r.returncode != 0:  # the plain paths run instead
                last = (r.stderr.strip().splitlines() or ["no message"])[-1]
                print(f"dn: building {src.name} with {cc} failed ({last}); using the slower plain path",
                      file=sys.stderr)
                return None
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return ctypes.CDLL(str(out))


def library(name: str) -> ctypes.CDLL | None:
    """The built kernel library `name`, or None when DN_NATIVE=0 or there is no C compiler."""
    return _build(name) if enabled() else None


def ptr(a) -> ctypes.c_void_p:
    """Address of a contiguous numpy array or CPU torch tensor."""
    if hasattr(a, "data_ptr"):
        if not a.is_contiguous():
            raise ValueError("native kernels take contiguous tensors")
        return ctypes.c_void_p(a.data_ptr())
    if not a.flags["C_CONTIGUOUS"]:
        raise ValueError("native kernels take contiguous arrays")
    return ctypes.c_void_p(a.ctypes.data)
