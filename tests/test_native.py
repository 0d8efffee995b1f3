"""The native build: one kernel compiled and called on numpy memory, and DN_NATIVE=0 turning it off."""

import ctypes

import numpy as np
import pytest

from dn.formats import native


def test_builds_and_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("DN_CACHE", str(tmp_path))
    native._build.cache_clear()
    lib = native.library("selftest")
    if lib is None:
        pytest.skip("no C compiler")
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
