"""Numpy reference of one decoder layer, computed from the spec: the oracle both backends are checked against.

Shapes: x [L, D]; q [H, L, hd]; k, v [KV, L, hd].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dn import safetensors_io
from dn.errors import DnError
from dn.spec import Architecture, ModelSpec, weight_files


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


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def linear(x: np.ndarray, w: dict, name: str) -> np.ndarray:
    y = x @ w[f"{name}.weight"].T
    bias = w.get(f"{name}.bias")
    return y if bias is None else y + bias


def attention(x: np.ndarray, w: dict, a: Architecture) -> np.ndarray:
    L = x.shape[0]
    heads = lambda t, n: t.reshape(L, n, a.head_dim).transpose(1, 0, 2)
    q = heads(linear(x, w, "self_attn.q_proj"), a.num_attention_heads)
    k = heads(linear(x, w, "self_attn.k_proj"), a.num_key_value_heads)
    v = heads(linear(x, w, "self_attn.v_proj"), a.num_key_value_heads)
    if "self_attn.q_norm.weight" in w:  # qwen3 normalises each head before rope
        q = rms_norm(q, w["self_attn.q_norm.weight"], a.rms_norm_eps)
        k = rms_norm(k, w["self_attn.k_norm.weight"], a.rms_norm_eps)
    q, k = rope(q, a.rope_theta), rope(k, a.rope_theta)
    group = a.num_attention_heads // a.num_key_value_heads
    k, v = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(a.head_dim)  # [H, L, L]
    scores = np.where(np.tri(L, dtype=bool), scores, -np.inf)
    out = (softmax(scores) @ v).transpose(1, 0, 2).reshape(L, -1)
    return linear(out, w, "self_attn.o_proj")


def mlp(x: np.ndarray, w: dict) -> np.ndarray:
    """SwiGLU: down(silu(gate x) * up x)."""
    return linear(silu(linear(x, w, "mlp.gate_proj")) * linear(x, w, "mlp.up_proj"), w, "mlp.down_proj")


def decoder_layer(h: np.ndarray, w: dict, a: Architecture) -> np.ndarray:
    if a.rope_scaling:
        raise DnError("the numpy reference implements default rope only")
    h = h + attention(rms_norm(h, w["input_layernorm.weight"], a.rms_norm_eps), w, a)
    return h + mlp(rms_norm(h, w["post_attention_layernorm.weight"], a.rms_norm_eps), w)


def layer_weights(model_dir: Path, spec: ModelSpec, i: int) -> dict[str, np.ndarray]:
    """float32 weights of layer i, keyed without the `model.layers.{i}.` prefix."""
    prefix = f"model.layers.{i}."
    out = {}
    for f in weight_files(model_dir):
        for name, (bits, dt) in safetensors_io.load(f).items():
            if name.startswith(prefix):
                x = safetensors_io.bf16_to_f32(bits) if dt == "BF16" else np.asarray(bits, dtype=np.float32)
                out[name[len(prefix):]] = x
    return out
