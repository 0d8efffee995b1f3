"""Progress while loading (issue 20, item 7): a bar over the bytes the loaders read through dn.core.tensors, drawn
only on a terminal, and for a small quick load not at all."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest

from dn.core import tensors


class _Stderr(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.fixture
def folder(tmp_path):
    tensors.save({"a": np.ones((64, 256), np.float32), "b": np.zeros(1000, np.uint8)}, tmp_path / "model.safetensors")
    return tmp_path


def _load(folder, monkeypatch, tty: bool, at_once: int) -> tuple[str, int]:
    """Read every tensor inside tensors.reading with stderr a fake terminal or not: (what stderr got, bytes the
    bar counted)."""
    err = _Stderr(tty)
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(tensors, "BAR_AT_ONCE_BYTES", at_once)
    with tensors.reading(folder) as bar, tensors.File(folder / "model.safetensors") as f:
        for _ in f.chunks("a", "bfloat16"):
            pass
        f.mapped("b")  # mapped, not read: in place at once
        counted = bar.n
    assert tensors._bar is None  # the hook is gone once the load is over
    return err.getvalue(), counted


def test_load_bar_on_a_terminal(folder, monkeypatch):
    text, counted = _load(folder, monkeypatch, tty=True, at_once=0)
    assert counted == 64 * 256 * 4 + 1000  # the bytes read, stored (not converted) sizes
    assert f"loading {folder.name}" in text and "B/s" in text


def test_no_bar_off_a_terminal(folder, monkeypatch):
    assert _load(folder, monkeypatch, tty=False, at_once=0)[0] == ""


def test_no_bar_for_a_small_quick_load(folder, monkeypatch):
    text, counted = _load(folder, monkeypatch, tty=True, at_once=tensors.BAR_AT_ONCE_BYTES)
    assert counted == 64 * 256 * 4 + 1000 and "loading" not in text
