"""CPU kernels written in C (dn/formats/csrc/<name>.c), built once per machine with the system compiler and called
through ctypes on numpy/torch memory. Backend-neutral: a kernel takes raw pointers and sizes, nothing else.

Built into <cache>/native/<name>-<key>.so, the key hashing the source, the flags, the compiler and this CPU's
flags (the build uses -march=native, so the AVX-512 blocks compile where the CPU has them); a temporary file then a
rename, so racing builds are harmless. `DN_NATIVE=0` turns every kernel off (the plain paths run). `library()`
returns None without a C compiler, or with one that builds nothing with FLAGS (no OpenMP, say). A kernel that fails
to build where the compiler works is a broken kernel: with `DN_REQUIRE_NATIVE=1` (the test suite sets it under
CI=true) that raises DnError; otherwise one line on stderr, and the plain paths run.
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
from dn.core.files import atomic_file, cache_dir

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


def required() -> bool:
    """DN_REQUIRE_NATIVE=1: a kernel that fails to build where the compiler works raises instead of falling back."""
    return os.environ.get("DN_REQUIRE_NATIVE") == "1"


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return cc if shutil.which(cc) else None
    return shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _compile(cc: str, src: Path, out: str) -> str | None:
    """Compile src into out with FLAGS; None when it built, else the compiler's first error line (or its last)."""
    r = subprocess.run([cc, *FLAGS, str(src), "-o", out, "-lm"], capture_output=True, text=True)
    lines = r.stderr.strip().splitlines() or ["no message"]
    return None if r.returncode == 0 else next((x.strip() for x in lines if "error" in x), lines[-1])


def toolchain_problem() -> str | None:
    """Why no kernel can build here ("no C compiler...", for skips and messages), or None: the compiler builds a
    stub with FLAGS, OpenMP included, so a kernel that then fails is the kernel's fault."""
    cc = _compiler()
    if cc is None:
        return "no C compiler (cc, gcc, clang or $CC)"
    with tempfile.TemporaryDirectory() as d:
        stub = Path(d) / "stub.c"
        stub.write_text("#ifdef _OPENMP\n#include <omp.h>\n#endif\nint dn_stub(void) { return 0; }\n")
        err = _compile(cc, stub, str(Path(d) / "stub.so"))
    return None if err is None else f"no C compiler that builds with {' '.join(FLAGS)} ({cc}: {err})"


def build(src: Path) -> ctypes.CDLL | None:
    """src (a kernel, with its headers beside it) built and loaded; None without a usable compiler. A compile error in
    src: DnError when required(), else one line on stderr and None (the plain paths run instead)."""
    cc = _compiler()
    if cc is None:
        return None
    if not src.exists():
        raise DnError(f"no native kernel source {src}")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    headers = [h.read_text() for h in sorted(src.parent.glob("*.h"))]  # what the sources include
    key = hashlib.sha256("\0".join([src.read_text(), *headers, " ".join(FLAGS), version, platform.machine(),
                                    _cpu_flags()]).encode()).hexdigest()[:16]
    out = cache_dir() / "native" / f"{src.stem}-{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(out) as tmp:
            err = _compile(cc, src, str(tmp))
            if err is not None:
                tmp.unlink(missing_ok=True)  # a failed build replaces nothing
                problem = toolchain_problem()
                if required() and problem is None:
                    raise DnError(f"building {src.name} with {cc} failed ({err}); DN_REQUIRE_NATIVE=1 makes that an "
                                  "error, not a fallback")
                print(f"dn: building {src.name} with {cc} failed ({problem or err}); using the slower plain path",
                      file=sys.stderr)
                return None
    return ctypes.CDLL(str(out))


@cache
def _build(name: str) -> ctypes.CDLL | None:
    return build(SRC / f"{name}.c")


def library(name: str) -> ctypes.CDLL | None:
    """The built kernel library `name`, or None when DN_NATIVE=0 or there is no usable C compiler (see build())."""
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
