"""Numpy reference of one decoder layer, computed from the spec: the oracle both backends are checked against.

Shapes: x [L, D]; q [H, L, hd]; k, v [KV, L, hd].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dn.core import tensors
from dn.core.activations import gelu_tanh, silu
from dn.core.errors import DnError
from dn.model.spec import Architecture, ModelSpec, weight_files


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    return (x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + eps) * w).astype(np.float32)


def rope(x: np.ndarray, theta: float) -> np.ndarray:
    """Rotate halves (the HF layout): x [H, L, hd]."""
    hd = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.arange(x.shape[1])[:, None] * inv[None]  # [L, hd/2]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    rotated = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)
    return (x * cos + rotated * sin).astype(np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def linear(x: np.ndarray, w: dict, name: str) -> np.ndarray:
    y = x @ w[f"{name}.weight"].T
    bias = w.get(f"{name}.bias")
    return y if bias is None else y + bias


def attention(x: np.ndarray, w: dict, a: Architecture, layer: int = 0) -> np.ndarray:
    L = x.shape[0]
    gemma = a.model_type == "gemma3_text"
    norm = gemma_norm if gemma else rms_norm
    sliding = gemma and a.layer_types[layer] == "sliding_attention"
    heads = lambda t, n: t.reshape(L, n, a.head_dim).transpose(1, 0, 2)
    q = heads(linear(x, w, "self_attn.q_proj"), a.num_attention_heads)
    k = heads(linear(x, w, "self_attn.k_proj"), a.num_key_value_heads)
    v = heads(linear(x, w, "self_attn.v_proj"), a.num_key_value_heads)
    if "self_attn.q_norm.weight" in w:  # qwen3 and gemma3 normalise each head before rope
        q = norm(q, w["self_attn.q_norm.weight"], a.rms_norm_eps)
        k = norm(k, w["self_attn.k_norm.weight"], a.rms_norm_eps)
    theta = a.rope_local_base_freq if sliding else a.rope_theta
    q, k = rope(q, theta), rope(k, theta)
    group = a.num_attention_heads // a.num_key_value_heads
    k, v = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)
    scale = a.query_pre_attn_scalar if gemma else a.head_dim
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(scale)  # [H, L, L]
    keep = np.tri(L, dtype=bool)
    if sliding:  # query i sees keys j with i - j < window
        keep &= ~np.tri(L, k=-a.sliding_window, dtype=bool)
    scores = np.where(keep, scores, -np.inf)
    out = (softmax(scores) @ v).transpose(1, 0, 2).reshape(L, -1)
    return linear(out, w, "self_attn.o_proj")


def mlp(x: np.ndarray, w: dict) -> np.ndarray:
    """SwiGLU: down(silu(gate x) * up x)."""
    return linear(silu(linear(x, w, "mlp.gate_proj")) * linear(x, w, "mlp.up_proj"), w, "mlp.down_proj")


def gemma_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """Gemma's RMSNorm scales by 1 + w."""
    return rms_norm(x, 1.0 + w.astype(np.float64), eps)


def gemma3_layer(h: np.ndarray, w: dict, a: Architecture, layer: int) -> np.ndarray:
    """Gemma 3: a norm before and after attention and the MLP (GeGLU, gelu tanh approximation)."""
    n = lambda x, name: gemma_norm(x, w[f"{name}.weight"], a.rms_norm_eps)
    h = h + n(attention(n(h, "input_layernorm"), w, a, layer), "post_attention_layernorm")
    x = n(h, "pre_feedforward_layernorm")
    y = linear(gelu_tanh(linear(x, w, "mlp.gate_proj")) * linear(x, w, "mlp.up_proj"), w, "mlp.down_proj")
    return h + n(y, "post_feedforward_layernorm")


def decoder_layer(h: np.ndarray, w: dict, a: Architecture, layer: int = 0) -> np.ndarray:
    if a.rope_scaling:
        raise DnError("the numpy reference implements default rope only")
    if a.model_type == "gemma3_text":
        return gemma3_layer(h, w, a, layer)
    h = h + attention(rms_norm(h, w["input_layernorm.weight"], a.rms_norm_eps), w, a)
    return h + mlp(rms_norm(h, w["post_attention_layernorm.weight"], a.rms_norm_eps), w)


def layer_weights(model_dir: Path, spec: ModelSpec, i: int) -> dict[str, np.ndarray]:
    """float32 weights of layer i, keyed without the `model.layers.{i}.` prefix."""
    prefix = f"model.layers.{i}."
    out = {}
    for path in weight_files(model_dir):
        with tensors.File(path) as f:
            out |= {name[len(prefix):]: f.read(name, "float32") for name in f.header if name.startswith(prefix)}
    return out
