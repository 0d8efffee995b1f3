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


def _steps(model, cache, prompt, n):
    """Greedy: the prompt [B, T], then n single-token steps -> the logits of each step [n + 1, B, vocab]."""
    out = [tm.logits(model, prompt, cache, last_only=True)[:, -1]]
    for _ in range(n):
        out.append(tm.logits(model, out[-1].argmax(-1)[:, None], cache, last_only=True)[:, -1])
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
    seen = _calls(monkeypatch)
    got = _steps(model, tm.make_cache(model), prompt, 12)
    assert len(seen) == 12  # every single-token step ran the lean step
    want = _steps(model, _forward_cache(model), prompt, 12)
    assert len(seen) == 12  # a transformers cache runs the forward
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
    apart = tm.load(native, load_spec(native), "bfloat16")
    attn = fused.model.layers[0].self_attn
    assert isinstance(attn.v_proj, _decode.Part)
    assert torch.equal(attn.v_proj.weight, apart.model.layers[0].self_attn.v_proj.weight)
    tokens = np.random.default_rng(7).integers(0, 49152, size=(1, 6))
    np.testing.assert_array_equal(tm.logits(fused, tokens), tm.logits(apart, tokens))
    got, want = (_steps(m, tm.make_cache(m), tokens, 5) for m in (fused, apart))
    np.testing.assert_array_equal(got, want)
