"""torch's lean decode step (dn_torch/_decode.py) against the model's own forward: the same logits, token by
token, on the families it runs, dense and quantized; the families it does not run fall back to the forward.
MLX decodes through mlx-lm's own step, so this is torch's alone."""

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch
from test_compose import _quantized
from test_families import VOCAB, tiny_model

from dn.model.spec import load_spec
from dn.serve.engine import cache_bytes
from dn_torch import _decode
from dn_torch import model as tm


def _steps(model, cache, prompt, n, fed=None):
    """The prompt [B, T], then n single-token steps, each fed its greedy token or fed[:, i] -> the logits of
    each step [n + 1, B, vocab]."""
    out = [tm.logits(model, prompt, cache, last_only=True)[:, -1]]
    for i in range(n):
        nxt = out[-1].argmax(-1)[:, None] if fed is None else fed[:, i:i + 1]
        out.append(tm.logits(model, nxt, cache, last_only=True)[:, -1])
    return np.stack(out)


def _forward_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _calls(monkeypatch):
    seen = []
    step = _decode.step
    monkeypatch.setattr(_decode, "step", lambda *a: seen.append(1) or step(*a))
    return seen


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("quantized", [False, True])
def test_step_is_the_forward(tmp_path, monkeypatch, model_type, dtype, quantized):
    folder = tiny_model(tmp_path / model_type, model_type)
    if quantized:
        folder = _quantized(folder, tmp_path / "q4g32")[0]
    model = tm.load(folder, load_spec(folder), dtype)
    prompt = np.random.default_rng(3).integers(0, VOCAB, size=(1, 9))
    monkeypatch.setattr(_decode, "_native", lambda model: None)  # the torch ops (C: test_c_step_...)
    seen = _calls(monkeypatch)
    got = _steps(model, tm.make_cache(model), prompt, 12)
    assert len(seen) == 12  # every single-token step ran the lean step
    want = _steps(model, _forward_cache(model), prompt, 12)
    assert len(seen) == 12  # a transformers cache runs the forward
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    got, want = (_steps(model, c, prompt[:, :1], 3) for c in (tm.make_cache(model), _forward_cache(model)))
    assert len(seen) == 12 + 4  # a one-token prompt: its first token is a step on an empty cache
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_batch_of_sequences(tmp_path):
    folder = tiny_model(tmp_path / "llama", "llama")
    model = tm.load(folder, load_spec(folder), "float32")
    prompt = np.random.default_rng(4).integers(0, VOCAB, size=(3, 5))
    got, want = (_steps(model, c, prompt, 6) for c in (tm.make_cache(model), _forward_cache(model)))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("model_type", ["gemma3_text", "qwen3", "mistral"])
def test_other_families_run_the_forward(tmp_path, monkeypatch, model_type):
    folder = tiny_model(tmp_path / model_type, model_type)
    model = tm.load(folder, load_spec(folder), "float32")
    seen = _calls(monkeypatch)
    prompt = np.random.default_rng(5).integers(0, VOCAB, size=(1, 12))
    got = _steps(model, tm.make_cache(model), prompt, 4)
    assert not seen
    np.testing.assert_allclose(got, _steps(model, _forward_cache(model), prompt, 4), rtol=0, atol=1e-6)


def test_a_bounded_cache_runs_the_forward(tmp_path, monkeypatch):
    folder = tiny_model(tmp_path / "llama", "llama")
    model = tm.load(folder, load_spec(folder), "float32")
    seen = _calls(monkeypatch)
    _steps(model, tm.make_cache(model, max_kv_size=8), np.zeros((1, 4), dtype=np.int64), 6)
    assert not seen


def test_grown_layer_is_concatenation():
    """Past its first room (256 tokens), after a crop and after a batch edit: the keys and values a plain
    DynamicLayer holds, and the room it holds counted in its bytes."""
    from transformers.cache_utils import DynamicLayer

    grown, plain = _decode.grown_layer()(), DynamicLayer()
    gen = torch.Generator().manual_seed(0)
    for t in [5, 1, 250, *[1] * 40, 7]:
        kv = torch.randn(2, 3, t, 4, generator=gen), torch.randn(2, 3, t, 4, generator=gen)
        for layer in (grown, plain):
            out = layer.update(*kv)
        assert all(torch.equal(a, b) for a, b in zip(out, (plain.keys, plain.values)))
        assert torch.equal(grown.keys, plain.keys) and torch.equal(grown.values, plain.values)
    assert grown.nbytes >= 2 * grown.keys.nbytes and cache_bytes([grown]) == grown.nbytes
    for edit in (lambda layer: layer.crop(-10), lambda layer: layer.batch_select_indices(torch.tensor([1]))):
        for layer in (grown, plain):
            edit(layer)
            layer.update(torch.ones(layer.keys.shape[0], 3, 2, 4), torch.ones(layer.keys.shape[0], 3, 2, 4))
        assert torch.equal(grown.keys, plain.keys) and torch.equal(grown.values, plain.values)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_fused_projections_compute_the_separate_ones(tmp_path, monkeypatch, model_type):
    """A -q model whose q, k, v and gate, up are whole blocks of the int4 pack's rows: joined at load (one
    matrix each, Parts in their places), the forward and the step give what the separate matrices give."""
    import test_families

    from dn_torch import quant

    big = quant._int4_block_rows()
    for name, value in (("H", 2 * big), ("HEADS", 4), ("KV", 2), ("HD", big // 2)):
        monkeypatch.setattr(test_families, name, value)
    folder = _quantized(tiny_model(tmp_path / model_type, model_type, inter=2 * big), tmp_path / "q4g32")[0]
    fused = tm.load(folder, load_spec(folder), "bfloat16")
    monkeypatch.setattr(_decode, "fuse", lambda model: None)
    monkeypatch.setattr(_decode, "_native", lambda model: None)  # the torch ops on both (C: test_c_step_...)
    apart = tm.load(folder, load_spec(folder), "bfloat16")
    layer = fused.model.layers[0]
    assert isinstance(layer.self_attn.k_proj, _decode.Part) and isinstance(layer.mlp.up_proj, _decode.Part)
    assert type(apart.model.layers[0].self_attn.k_proj) is quant.QuantizedLinear
    held = {m: sum(t.nbytes for t in m.buffers()) for m in (fused, apart)}
    assert held[fused] == held[apart]  # the joined matrices replace the separate ones
    tokens = np.random.default_rng(6).integers(0, VOCAB, size=(1, 10))
    np.testing.assert_array_equal(tm.logits(fused, tokens), tm.logits(apart, tokens))
    assert layer.self_attn.dn_fused._memo is None and layer.mlp.dn_fused._memo is None
    seen = _calls(monkeypatch)
    got, want = (_steps(m, tm.make_cache(m), tokens, 8) for m in (fused, apart))
    assert len(seen) == 16
    np.testing.assert_array_equal(got, want)


def test_fused_gguf_blocks_compute_the_separate_ones(monkeypatch):
    """The default model's native GGUF folder (Q4_1 blocks): q, k, v and gate, up joined at load; the forward and
    the step give what the separate matrices give, bit for bit."""
    from dn.model.sources import resolve_model

    native = resolve_model(None, progress=False)
    fused = tm.load(native, load_spec(native), "bfloat16")
    monkeypatch.setattr(_decode, "fuse", lambda model: None)
    monkeypatch.setattr(_decode, "_native", lambda model: None)
    apart = tm.load(native, load_spec(native), "bfloat16")
    attn = fused.model.layers[0].self_attn
    assert isinstance(attn.v_proj, _decode.Part)
    assert torch.equal(attn.v_proj.weight, apart.model.layers[0].self_attn.v_proj.weight)
    tokens = np.random.default_rng(7).integers(0, 49152, size=(1, 6))
    np.testing.assert_array_equal(tm.logits(fused, tokens), tm.logits(apart, tokens))
    got, want = (_steps(m, tm.make_cache(m), tokens, 5) for m in (fused, apart))
    np.testing.assert_array_equal(got, want)


def _bits(rng, shape, scale=1.0, base=0.0):
    from dn.core import tensors

    return tensors.f32_to_bf16((base + scale * rng.standard_normal(shape)).astype(np.float32))


def _close(got, want, exact=0.99):
    """bfloat16 bits: within one rounding step of the reference's, and nearly all equal."""
    from dn.core import tensors

    g, w = tensors.bf16_to_f32(got), tensors.bf16_to_f32(want)
    assert np.all(np.abs(g - w) <= 2.0 ** -7 * np.abs(w) + 1e-30), np.abs(g - w).max()
    assert (got == want).mean() >= exact


@pytest.mark.parametrize("batch,nq,nkv,hd,n", [(1, 9, 3, 64, 0), (2, 12, 2, 128, 37), (1, 4, 4, 16, 300)])
def test_c_steps_are_their_reference(batch, nq, nkv, hd, n):
    """dn/formats/csrc/decode.c against dn/formats/decode.py: rope, the cache write and attention (grouped
    queries, batches, the first position and a long cache), the residual add and norm, SiLU times up."""
    from dn.formats import decode as ref
    from dn.formats.native import ptr

    lib = ref.native()
    if lib is None:
        pytest.skip("dn's C kernels are not built here")
    rng = np.random.default_rng(n)
    cap, d = n + 3, 96
    qkv = _bits(rng, (batch, (nq + 2 * nkv) * hd))
    cos, sin = _bits(rng, hd, 0.5, 0.5), _bits(rng, hd, 0.5)
    keys, values = _bits(rng, (batch, nkv, cap, hd)), _bits(rng, (batch, nkv, cap, hd))
    c = [a.copy() for a in (qkv, keys, values)]
    out = np.empty((batch, nq * hd), np.uint16)
    assert lib.dn_attend(ptr(c[0]), batch, nq, nkv, hd, ptr(cos), ptr(sin), ptr(c[1]), ptr(c[2]), cap, n, 0.3,
                         ptr(out)) == 0
    want = ref.attend(qkv, nq, nkv, cos, sin, keys, values, n, 0.3)
    for got, w in zip(c, (qkv, keys, values)):
        np.testing.assert_array_equal(got, w)  # rope and the cache write: the same roundings
    _close(out, want)
    h, y, w = _bits(rng, (batch, d)), _bits(rng, (batch, d)), _bits(rng, d, 0.1, 1.0)
    for add in (y, None):
        hc, o = h.copy(), np.empty_like(h)
        lib.dn_add_norm(ptr(hc), None if add is None else ptr(add), ptr(w), 1e-6, d, batch, ptr(o))
        rh, ro = ref.add_norm(h, add, w, 1e-6)
        np.testing.assert_array_equal(hc, rh)
        _close(o, ro)
    gu, o = _bits(rng, (batch, 2 * d), 3.0), np.empty((batch, d), np.uint16)
    lib.dn_silu_mul(ptr(gu), d, batch, ptr(o))
    _close(o, ref.silu_mul(gu))


@pytest.mark.parametrize("joined", [True, False])
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_c_step_is_the_forward_in_bfloat16(tmp_path, monkeypatch, model_type, joined):
    """A bfloat16 step runs its small ops in C, with q, k, v and gate, up joined or not: its logits are the
    forward's within bfloat16's parity tolerance, step after step; DN_NATIVE=0 runs the torch ops instead."""
    import test_families

    from dn.core.tolerances import PARITY
    from dn.formats import decode as ref
    from dn_torch import quant

    if ref.native() is None:
        pytest.skip("dn's C kernels are not built here")
    big = quant._int4_block_rows()
    for name, value in (("H", 2 * big), ("HEADS", 4), ("KV", 2), ("HD", big // 2)):
        monkeypatch.setattr(test_families, name, value)
    folder = _quantized(tiny_model(tmp_path / model_type, model_type, inter=2 * big), tmp_path / "q4g32")[0]
    if not joined:
        monkeypatch.setattr(_decode, "fuse", lambda model: None)
    model = tm.load(folder, load_spec(folder), "bfloat16")
    assert isinstance(model.model.layers[0].self_attn.q_proj, _decode.Part) is joined
    seen, native_step = [], _decode._native_step
    monkeypatch.setattr(_decode, "_native_step", lambda *a: seen.append(1) or native_step(*a))
    tokens, fed = np.random.default_rng(8).integers(0, VOCAB, size=(2, 7)), np.random.default_rng(9).integers(
        0, VOCAB, size=(2, 10))  # fed, not greedy: bfloat16 noise may flip a near tie, then the texts part
    got = _steps(model, tm.make_cache(model), tokens, 10, fed)
    assert len(seen) == 10
    want = _steps(model, _forward_cache(model), tokens, 10, fed)
    err = np.abs(got - want).max(-1) / np.abs(want).max(-1)
    assert err.max() < PARITY["bfloat16"].max_rel_err, err.max()
    one = _steps(model, tm.make_cache(model), tokens[:, :1], 3, fed)  # a one-token prompt: a step on an empty cache
    assert len(seen) == 14
    err = np.abs(one - _steps(model, _forward_cache(model), tokens[:, :1], 3, fed)).max(-1)
    assert err.max() < PARITY["bfloat16"].max_rel_err * np.abs(one).max(), err.max()
    monkeypatch.setenv("DN_NATIVE", "0")
    plain = tm.load(folder, load_spec(folder), "bfloat16")
    np.testing.assert_array_equal(_steps(plain, tm.make_cache(plain), tokens, 3, fed), want[:4])
    assert len(seen) == 14
