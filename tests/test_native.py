"""The native build: one kernel compiled and called on numpy memory, DN_NATIVE=0 turning it off, and the rule that
a kernel which fails to build (its AVX-512 fast path included) fails the tests in CI instead of skipping them."""

import ctypes
import shutil
import subprocess

import numpy as np
import pytest
from helpers import native_or_skip, require_native_in_ci

from dn.core.errors import DnError
from dn.formats import fixed4, native, planes, sparse

# Each kernel's fast-path block: the guard line, as the source has it.
FAST = {"planes": "#if defined(__AVX512VBMI__) && defined(__AVX512BF16__)",
        "codec_runtime": "#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)",
        "sparse": "#if defined(__AVX512BF16__)"}
FAST_MACROS = {"__AVX512VBMI__", "__AVX512BF16__"}


def test_builds_and_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("DN_CACHE", str(tmp_path))
    native._build.cache_clear()
    lib = native_or_skip(lambda: native.library("selftest"))
    a, b = np.arange(300, dtype=np.uint8), np.full(300, 7, np.uint8)
    out = np.zeros(300, np.uint8)
    lib.dn_add_u8(native.ptr(a), native.ptr(b), native.ptr(out), ctypes.c_int64(300))
    np.testing.assert_array_equal(out, a + b)
    assert list((tmp_path / "native").glob("selftest-*.so"))
    native._build.cache_clear()


def test_switched_off(monkeypatch):
    monkeypatch.setenv("DN_NATIVE", "0")
    assert native.library("selftest") is None


def test_rejects_strided():
    with pytest.raises(ValueError):
        native.ptr(np.zeros((4, 4))[:, 0])


def test_failed_build_falls_back(tmp_path, monkeypatch, capsys):
    """A compiler that cannot build the kernel (here: one that always fails) leaves the plain paths running."""
    monkeypatch.setenv("DN_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    native._build.cache_clear()
    try:
        assert native.library("selftest") is None
    finally:
        native._build.cache_clear()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "selftest.c" in err[0] and "plain path" in err[0]


# ---- a kernel that fails to build: a failure in CI, never a skip -----------------------------------------

def _macros() -> set[str]:
    """What the compiler defines under the build's FLAGS on this CPU (-march=native)."""
    cc = native._compiler()
    if cc is None:
        return set()
    out = subprocess.run([cc, *native.FLAGS[:2], "-dM", "-E", "-x", "c", "/dev/null"], capture_output=True, text=True)
    return {line.split()[1] for line in out.stdout.splitlines() if line.startswith("#define")}


def _copy_with_error(tmp_path, name: str, after: str | None):
    """dn/formats/csrc/<name>.c (and its headers) with an #error just after the line `after` (None: on top)."""
    for h in native.SRC.glob("*.h"):
        shutil.copy(h, tmp_path)
    text = (native.SRC / f"{name}.c").read_text()
    if after is None:
        text = '#error "broken on purpose (test)"\n' + text
    else:
        assert after in text
        text = text.replace(after, after + '\n#error "broken on purpose (test)"', 1)
    src = tmp_path / f"{name}.c"
    src.write_text(text)
    return src


def _check_ci_rule(src, monkeypatch, capsys):
    """src does not build: under the CI rule that raises, through the loader the tests use; off CI it prints one
    line and gives None, and the tests' helper still fails rather than skips (the compiler works)."""
    native_or_skip(lambda: native.library("selftest"))  # a working compiler, else skip: no C compiler
    env = {"CI": "true"}
    require_native_in_ci(env)
    assert env["DN_REQUIRE_NATIVE"] == "1"
    monkeypatch.setenv("DN_REQUIRE_NATIVE", env["DN_REQUIRE_NATIVE"])
    with pytest.raises(DnError, match=f"building {src.name} .*broken on purpose"):
        native_or_skip(lambda: native.build(src))
    monkeypatch.delenv("DN_REQUIRE_NATIVE")
    assert native.build(src) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and src.name in err[0] and "broken on purpose" in err[0] and "plain path" in err[0]
    with pytest.raises(pytest.fail.Exception, match="failed to build"):
        native_or_skip(lambda: native.build(src))


@pytest.mark.parametrize("name", FAST)
def test_broken_fast_path_fails_in_ci(name, tmp_path, monkeypatch, capsys):
    """An #error inside the kernel's AVX-512 block, built with the real FLAGS: where -march=native compiles that
    block (this CPU has AVX512-VBMI and BF16) the build fails, and in CI that fails the run."""
    if not _macros() >= FAST_MACROS:
        pytest.skip("-march=native here defines no AVX512-VBMI/BF16: the fast-path blocks are not compiled")
    monkeypatch.setenv("DN_CACHE", str(tmp_path / "cache"))
    _check_ci_rule(_copy_with_error(tmp_path, name, FAST[name]), monkeypatch, capsys)


def test_broken_kernel_fails_in_ci(tmp_path, monkeypatch, capsys):
    """The same rule on any CPU: an #error outside any #if."""
    monkeypatch.setenv("DN_CACHE", str(tmp_path / "cache"))
    _check_ci_rule(_copy_with_error(tmp_path, "selftest", None), monkeypatch, capsys)


def test_ci_rule():
    for env, want in [({"CI": "true"}, "1"), ({"CI": "1"}, "1"), ({"CI": "true", "DN_REQUIRE_NATIVE": "0"}, "0"),
                      ({}, None), ({"CI": "false"}, None)]:
        require_native_in_ci(env)
        assert env.get("DN_REQUIRE_NATIVE") == want, env


def test_only_a_missing_compiler_skips(monkeypatch):
    """No compiler (CC names none) skips, saying so, even under DN_REQUIRE_NATIVE=1."""
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("DN_REQUIRE_NATIVE", "1")
    native._build.cache_clear()
    try:
        with pytest.raises(pytest.skip.Exception, match="no C compiler"):
            native_or_skip(lambda: native.library("selftest"))
    finally:
        native._build.cache_clear()


def test_fast_paths_are_what_runs_here():
    """The kernels the tests exercise are the fast paths wherever the CPU has them: the build asks for -march=native,
    and on a CPU with AVX512-VBMI and BF16 each kernel reports (or shows) its AVX-512 block compiled in."""
    assert "-march=native" in native.FLAGS
    flags = native._cpu_flags().split()
    if not {"avx512vbmi", "avx512_bf16"} <= set(flags):
        pytest.skip("this CPU has no AVX512-VBMI/BF16: the portable loops run (tests/test_planes.py builds them too)")
    assert _macros() >= FAST_MACROS
    assert native_or_skip(planes.native).dn_planes_isa() == 1
    assert native_or_skip(sparse.native).dn_sparse_isa() == 1   # 1: the AVX512_BF16 pair dots
    lib, one = native_or_skip(fixed4.native), np.zeros(16, np.uint8)
    x, y = np.zeros(1, np.uint16), np.zeros(1, np.float32)
    p = native.ptr
    # no rows: returns 0 where the bf16 block is built, -2 ("not built on this CPU") otherwise
    assert lib.dn_fixed4_matvec_bf16(p(one), p(one), p(one), 0, 0, None, None, 0, p(x), 1, p(y), 1) == 0
