"""The small steps of a decoder layer between its matmuls for one token per sequence (dn/formats/csrc/decode.c,
which the torch decode step calls): this numpy reference says what each computes and rounds, bfloat16 held as its
uint16 bits. Tested against the C kernels (tests/test_decode.py); the step is tested against the model's forward."""

from __future__ import annotations

import ctypes

import numpy as np

from dn.core import tensors
from dn.formats import native as nat


def _f(bits: np.ndarray) -> np.ndarray:
    return tensors.bf16_to_f32(np.ascontiguousarray(bits))


def _b(x: np.ndarray) -> np.ndarray:
    return tensors.f32_to_bf16(np.asarray(x, dtype=np.float32))


def add_norm(h: np.ndarray, y: np.ndarray | None, w: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """(h + y rounded, w * bf16(h / rms(h))): the residual add, then LlamaRMSNorm (float32, rounded, times w)."""
    if y is not None:
        h = _b(_f(h) + _f(y))
    hf = _f(h)
    inv = (1.0 / np.sqrt((hf * hf).mean(-1, keepdims=True, dtype=np.float32) + np.float32(eps))).astype(np.float32)
    return h, _b(_f(w) * _f(_b(hf * inv)))


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [..., hd] * cos + rotate_half(x) * sin, each product and the sum rounded (torch's bfloat16 ops)."""
    xf, half = _f(x), x.shape[-1] // 2
    rot = np.concatenate([-xf[..., half:], xf[..., :half]], -1)
    return _b(_f(_b(xf * _f(cos))) + _f(_b(rot * _f(sin))))


def attend(qkv: np.ndarray, nq: int, nkv: int, cos, sin, keys: np.ndarray, values: np.ndarray, n: int,
           scale: float) -> np.ndarray:
    """qkv [B, (nq + 2 nkv) hd]: rope on its queries and keys, which with its values are written into keys and
    values [B, nkv, cap, hd] at position n (in place, qkv too); -> each query head over positions 0..n of its key
    head [B, nq * hd] (float32 scores and sums, the weights rounded to bfloat16 for the values' sum)."""
    b, hd = qkv.shape[0], keys.shape[-1]
    x = qkv.reshape(b, nq + 2 * nkv, hd)
    x[:, :nq + nkv] = rope(x[:, :nq + nkv], cos, sin)
    keys[:, :, n], values[:, :, n] = x[:, nq:nq + nkv], x[:, nq + nkv:]
    q = _f(x[:, :nq]).reshape(b, nkv, nq // nkv, hd)
    k, v = _f(keys[:, :, :n + 1]), _f(values[:, :, :n + 1])
    s = np.einsum("bgqd,bgjd->bgqj", q, k) * np.float32(scale)
    p = np.exp(s - s.max(-1, keepdims=True))
    o = np.einsum("bgqj,bgjd->bgqd", _f(_b(p)), v) / p.sum(-1, keepdims=True)  # P rounded for P @ V, as torch's
    # CPU flash attention rounds it (bit for bit its output over one block of keys, 512 or fewer)
    return _b(o.reshape(b, nq * hd))


def silu_mul(gu: np.ndarray) -> np.ndarray:
    """gu [B, 2n] (gate | up) -> bf16(silu(gate)) * up, rounded."""
    g, u = np.split(_f(gu), 2, -1)
    return _b(_f(_b(g / (1 + np.exp(-g)))) * u)


def native():
    """dn/formats/csrc/decode.c with its signatures set, or None (DN_NATIVE=0, no compiler)."""
    lib = nat.library("decode")
    if lib is not None and not hasattr(lib, "dn_ready"):
        p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
        lib.dn_add_norm.argtypes = [p, p, p, f32, i64, i64, p]
        lib.dn_attend.argtypes = [p, i64, i64, i64, i64, p, p, p, p, i64, i64, f32, p]
        lib.dn_silu_mul.argtypes = [p, i64, i64, p]
        lib.dn_ready = True
    return lib
