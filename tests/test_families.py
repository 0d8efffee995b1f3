"""Every supported family, as a tiny random model: both backends agree and match the numpy reference.

The tiny Gemma 3 has a sliding window (8) shorter than the 24 tokens, a full-attention second layer with its own
rope base, and an attention scale that is not 1/sqrt(head_dim), so each of these has to reach both backends."""

import json

import numpy as np
import pytest

from dn.core import tensors as safetensors_io
from dn.core.tolerances import PARITY
from dn.model import reference
from dn.model.spec import load_spec

H, INTER, LAYERS, HEADS, KV, HD, VOCAB = 64, 96, 2, 4, 2, 16, 128


def tiny_model(path, model_type: str, inter: int = INTER):
    rng = np.random.default_rng(0)
    cfg = {"model_type": model_type, "hidden_size": H, "intermediate_size": inter, "num_hidden_layers": LAYERS,
           "num_attention_heads": HEADS, "num_key_value_heads": KV, "head_dim": HD, "vocab_size": VOCAB,
           "rms_norm_eps": 1e-6, "max_position_embeddings": 128, "tie_word_embeddings": model_type != "mistral",
           "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}}
    shapes = {"model.embed_tokens.weight": (VOCAB, H), "model.norm.weight": (H,)}
    if model_type == "gemma3_text":
        cfg |= {"hidden_activation": "gelu_pytorch_tanh", "sliding_window": 8, "query_pre_attn_scalar": 24,
                "layer_types": ["sliding_attention", "full_attention"], "rope_local_base_freq": 10000.0,
                "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 50000.0},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (VOCAB, H)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (HEADS * HD, H), p + "self_attn.k_proj.weight": (KV * HD, H),
                   p + "self_attn.v_proj.weight": (KV * HD, H), p + "self_attn.o_proj.weight": (H, HEADS * HD),
                   p + "mlp.gate_proj.weight": (inter, H), p + "mlp.up_proj.weight": (inter, H),
                   p + "mlp.down_proj.weight": (H, inter), p + "input_layernorm.weight": (H,),
                   p + "post_attention_layernorm.weight": (H,)}
        if model_type == "qwen2":
            shapes |= {p + f"self_attn.{n}_proj.bias": (d,) for n, d in (("q", HEADS * HD), ("k", KV * HD),
                                                                         ("v", KV * HD))}
        if model_type in ("qwen3", "gemma3_text"):
            shapes |= {p + "self_attn.q_norm.weight": (HD,), p + "self_attn.k_norm.weight": (HD,)}
        if model_type == "gemma3_text":
            shapes |= {p + "pre_feedforward_layernorm.weight": (H,), p + "post_feedforward_layernorm.weight": (H,)}
    weights = {}
    norm_base = 0.0 if model_type == "gemma3_text" else 1.0  # Gemma's norms scale by 1 + w
    for name, shape in shapes.items():
        x = norm_base + 0.1 * rng.standard_normal(shape) if "norm" in name else 0.2 * rng.standard_normal(shape)
        weights[name] = (safetensors_io.f32_to_bf16(x.astype(np.float32)), "BF16")
    path.mkdir()
    safetensors_io.save(weights, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"])
def test_family_runs_on_both_backends(tmp_path, model_type):
    pytest.importorskip("mlx_lm")
    from dn.runtime import backend as backends

    model_dir = tiny_model(tmp_path / model_type, model_type)
    spec = load_spec(model_dir)
    tokens = np.random.default_rng(1).integers(0, VOCAB, size=(1, 24))
    out = {}
    for name in ("mlx", "torch"):
        be = backends.get(name)
        model = be.load(model_dir, spec, "float32")
        out[name] = be.logits(model, tokens)[0]
        hidden = be.hidden_states(model, tokens)
        for i in range(LAYERS):
            w = reference.layer_weights(model_dir, spec, i)
            ref = reference.decoder_layer(hidden[i], w, spec.architecture, i)
            assert np.abs(ref - hidden[i + 1]).max() / np.abs(ref).max() < PARITY["float32"].hidden_rel_err, (name, i)
    err = np.abs(out["mlx"] - out["torch"]).max(-1) / np.abs(out["torch"]).max(-1)
    assert err.max() < PARITY["float32"].max_rel_err


@pytest.mark.parametrize("backend_name", ["torch", "mlx"])
def test_gemma3_residency_runs_the_models_activation(tmp_path, backend_name):
    """Residency's blocks compute the model's activation (GELU tanh here, not SiLU): half the blocks cold, the
    logits are the fully resident model's."""
    if backend_name == "mlx":
        pytest.importorskip("mlx_lm")
    from dn.runtime import backend as backends
    from dn.runtime import residency

    be = backends.get(backend_name)
    folder = tiny_model(tmp_path / "gemma", "gemma3_text", inter=2 * residency.BLOCK)
    spec = load_spec(folder)
    probe = residency.open_runtime(be, folder, spec, "float32", 10**12)
    p = probe.plan
    rt = residency.open_runtime(be, folder, spec, "float32", p.fixed + p.side + (p.layers + 1) * p.block_bytes)
    assert rt.plan.hot == [1] * LAYERS
    tokens = np.random.default_rng(2).integers(0, VOCAB, size=(1, 12))
    got = be.logits(be.load(folder, spec, "float32", residency=rt), tokens)
    want = be.logits(be.load(folder, spec, "float32"), tokens)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * np.abs(want).max())


def test_gemma3_quantized_runs_its_dequantized_twin_on_both_backends(tmp_path):
    """-q on Gemma 3: the quantized embedding keeps Gemma's scale on torch (its own module does the scaling, and
    only a plain Embedding is swapped for a quantized one) and both backends compute the dense model holding
    the dequantized weights."""
    pytest.importorskip("mlx_lm")
    from test_compose import _quantized

    from dn.runtime import backend as backends

    q, twin = _quantized(tiny_model(tmp_path / "gemma", "gemma3_text"), tmp_path / "q4g32")
    tokens = np.random.default_rng(4).integers(0, VOCAB, size=(1, 16))
    want = backends.get("torch").logits(backends.get("torch").load(twin, load_spec(twin), "float32"), tokens)[0]
    for name in ("torch", "mlx"):
        be = backends.get(name)
        got = be.logits(be.load(q, load_spec(q), "float32"), tokens)[0]
        err = np.abs(got - want).max(-1) / np.abs(want).max(-1)
        assert err.max() < PARITY["float32"].max_rel_err, name
