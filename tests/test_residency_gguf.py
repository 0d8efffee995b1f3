"""Residency over a native GGUF folder's blocks (torch): blocks of whole k-quant super-blocks (256 neurons), each
layer's own block types in the cold file, an untied input embedding read from the file (not held), and exact mode
computing the fully resident model."""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pytest

from dn.core.errors import DnError
from dn.model import store
from dn.model.spec import load_spec
from dn.runtime import residency

torch = pytest.importorskip("torch")
from test_gguf_kernel import _gguf_folder  # noqa: E402  (after the skip: it needs torch)

from dn.runtime import backend as backends  # noqa: E402
from dn_torch import model as torch_model  # noqa: E402

TOKENS = np.random.default_rng(5).integers(0, 320, size=(1, 7))


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def folder(request, tmp_path_factory):
    return _gguf_folder(tmp_path_factory.mktemp("gguf-residency"), request.param)[0]


def _half_budget(be, folder, spec):
    """A budget holding one of each layer's two blocks (and a buffer of one)."""
    probe = residency.open_runtime(be, folder, spec, "float32", 10**12)
    p = probe.plan
    return p.fixed + p.layers * p.block_bytes + p.buffer_block_bytes + p.layers  # mean blocks; the largest buffered


def test_plan_over_gguf_blocks(folder):
    spec = load_spec(folder)
    be = backends.resolve("torch")
    assert residency.block_size(spec) == 256  # the k-quant super-block along the down projection's columns
    rt = residency.open_runtime(be, folder, spec, "float32", 10**12)
    untied = not spec.architecture.tie_word_embeddings
    assert rt.plan.cold_embedding is untied
    cold = {"model.embed_tokens.weight"} if untied else set()  # an untied embedding is not in the fixed part
    held = store.held_bytes(spec, "float32", lambda e: e.role != "mlp" and e.name not in cold)
    assert rt.plan.fixed == held > 0
    types = rt.tier.index["part"]["types"]
    assert types == [[spec.gguf[f"model.layers.{i}.mlp.{p}_proj"] for p in ("gate", "up", "down")] for i in range(2)]
    sizes = [sum(t["outer"] * t["inner"] for t in lay) for lay in rt.tier.layouts]
    assert len(set(sizes)) == 2  # the layers' blocks differ in bytes: each layer keeps its own layout


@pytest.mark.parametrize("prefetch", [False, True])
def test_exact_mode_is_the_resident_model(folder, prefetch):
    """Cold blocks read per token, or read ahead and laid out on a worker thread."""
    spec = load_spec(folder)
    be = backends.resolve("torch")
    full = torch_model.load(folder, spec, "float32")
    want = torch_model.logits(full, TOKENS)
    rt = residency.open_runtime(be, folder, spec, "float32", _half_budget(be, folder, spec))
    rt.prefetch = prefetch  # on the one-buffer plan: with two layers, a two-layer buffer would hold every block
    assert rt.plan.hot == [1, 1]
    model = torch_model.load(folder, spec, "float32", residency=rt)
    rt.reset_counters()
    got = torch_model.logits(model, TOKENS)
    assert rt.tier.fetched > 0 and rt.stats()["hit_rate"] == 0.5  # the cold block of each layer was read
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * float(np.abs(want).max()))
    assert (got.argmax(-1) == want.argmax(-1)).all()
    if prefetch:  # the worker read and joined layer 1 while layer 0 computed, and layer 0 for the next call
        assert rt._next and all(isinstance(f.result()[0], list) for f in rt._next.values())  # layer 0's, joined
        np.testing.assert_allclose(torch_model.logits(model, TOKENS), got, rtol=0, atol=1e-5 * float(np.abs(got).max()))


@pytest.mark.parametrize("inner", [210, 144, 12, 7, 6])
def test_block_sums_kernel_is_the_numpy_checksum(inner, monkeypatch):
    """dn/formats/csrc/checksum.c against cold.checksum's numpy path, on a run of blocks inside a larger layout (rows
    strided, as the cold file's views are), for each word width."""
    from helpers import native_or_skip

    from dn.runtime.residency import cold

    native_or_skip(cold._sums)
    a = np.random.default_rng(inner).integers(0, 256, (300, 9, inner), dtype=np.uint8)[:, 2:7]
    got = cold.checksum(a)
    lib, out = cold._sums(), np.empty(5, np.uint64)
    assert lib.dn_block_sums(a.ctypes.data, 300, a.strides[0], 5, inner, out.ctypes.data) == 0  # the kernel ran
    assert (out == got).all()
    monkeypatch.setattr(cold, "_sums", lambda: None)
    assert (got == cold.checksum(a)).all()
    a = a.copy()
    a[5, 1, 0] ^= 1
    assert (cold.checksum(a) != got).sum() == 1  # one changed byte changes its block's sum only


def test_prefetch_plans_two_buffers(default_spec):
    """With the next layer read ahead, two layers' cold runs are held at once: the plan keeps room for both."""
    bb = residency.block_bytes(default_spec, "bfloat16")
    budget = int(0.7 * residency.dense_bf16(default_spec))  # the dense widening: its minimum is 42.8%
    one, two = (residency.make_plan(default_spec, "bfloat16", budget, "exact", bb, b) for b in (1, 2))
    assert two.buffer_blocks == 2 * (two.blocks - min(two.hot)) and one.buffer_blocks == one.blocks - min(one.hot)
    assert two.resident <= budget and one.resident <= budget and sum(two.hot) < sum(one.hot)
    assert two.minimum - one.minimum == one.blocks * bb
    big = residency.make_plan(default_spec, "bfloat16", budget, "exact", bb, 1, buffer_block_bytes=2 * bb)
    assert big.resident <= budget and big.buffer_blocks * 2 * bb == big.resident - big.fixed - sum(big.hot) * bb
    assert sum(big.hot) < sum(one.hot)  # a buffer sized for the largest layer leaves less for resident blocks


def test_cached_runs_are_checked_once_and_a_changed_file_again(folder, monkeypatch):
    """A run read again from the page cache of an unchanged file is not summed again; one read from the disk (after
    the cache is dropped) is, and a file changed in place (same size) is caught on the next read."""
    from dn.runtime.residency import cold

    spec = load_spec(folder)
    rt = residency.open_runtime(backends.resolve("torch"), folder, spec, "float32", 10**12)
    tier = rt.tier
    sums = []
    real = cold.checksum
    monkeypatch.setattr(cold, "checksum", lambda v: sums.append(1) or real(v))
    tier.read(0, 0, 2)
    first = len(sums)
    assert first == 3  # gate, up, down
    tier.release(0)
    tier.read(0, 0, 2)
    tier.release(0)
    if not tier._in_page_cache(*tier._span(0, 0, 0, 2)):
        pytest.skip("this platform cannot tell what the page cache holds (mincore): every read is checked")
    assert len(sums) == first  # cached and checked: not summed again
    tier.drop_cache()
    tier.read(0, 0, 2)
    tier.release(0)
    assert len(sums) > first or tier._in_page_cache(*tier._span(0, 0, 0, 2))  # from the disk: checked
    path = tier.dir / residency.COLD
    data = bytearray(path.read_bytes())
    data[tier.index["layers"][0]["offsets"][0]] ^= 0xFF
    try:
        with open(path, "r+b") as f:  # in place, same size: the mapping sees it
            f.write(data)
        os.utime(path, ns=(time.time_ns() + 10**9,) * 2)  # a later mtime, even on a coarse clock
        with pytest.raises(DnError, match="fails its checksum"):
            tier.read(0, 0, 2)
    finally:
        tier.close()
        shutil.rmtree(tier.dir)  # rebuilt by the next test that needs it
