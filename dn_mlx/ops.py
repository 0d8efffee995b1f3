"""The array ops dn's backend-neutral layers (dn/runtime/sparse_mlp.py) are written over, on MLX.

dn_torch/ops.py has the same functions; a test checks the two modules match, name for name."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx import nn

from dn.formats import sparse as ref
from dn_mlx import quant


def hold(module: nn.Module, name: str, array: mx.array) -> None:
    """Keep an array on a module so it is listed with the module's weights."""
    setattr(module, name, array)


def from_numpy(a: np.ndarray, like: mx.array) -> mx.array:
    """numpy -> array on MLX's default device (dtype kept; `like` for the torch twin's device)."""
    return mx.array(np.ascontiguousarray(a))


def to_numpy(a: mx.array) -> np.ndarray:
    return np.array(a)


def float32(x: mx.array) -> mx.array:
    return x.astype(mx.float32)


def cast(x: mx.array, like: mx.array) -> mx.array:
    return x.astype(like.dtype)


def weight_like(module: nn.Module) -> mx.array:
    """An array with the module's compute dtype (any weight format)."""
    if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):  # scales may be held 16-bit
        return mx.zeros((), getattr(module, "_compute", module.scales.dtype))
    leaves = nn.utils.tree_flatten(module.parameters())
    return next(v for _, v in leaves if mx.issubdtype(v.dtype, mx.floating))


def act(name: str, x: mx.array) -> mx.array:
    """The gated MLP's activation by name (dn.formats.sparse.ACTS)."""
    if name == "gelu_tanh":
        return nn.gelu_approx(x)
    return nn.silu(x)


def abs(x: mx.array) -> mx.array:
    return mx.abs(x)


def zero_where(x: mx.array, mask: mx.array) -> mx.array:
    return mx.where(mask, mx.zeros((), x.dtype), x)


def topk_mask(s: mx.array, k: int) -> mx.array:
    idx = mx.argpartition(-s, k - 1, axis=1)[:, :k]
    return mx.put_along_axis(mx.zeros(s.shape, mx.bool_), idx, mx.array(True), axis=1)


def kept_indices(mask: mx.array) -> mx.array:
    """bool [T, n] with the same count per row -> sorted indices [T, k] (MLX has no nonzero: host side)."""
    m = np.array(mask)
    return mx.array(np.nonzero(m)[1].reshape(m.shape[0], -1).astype(np.uint32))


def take(a: mx.array, idx: mx.array) -> mx.array:
    return mx.take(a, idx)


def take_rows(w: mx.array, idx: mx.array) -> mx.array:
    """w [n, ...], idx [T, k] -> [T, k, ...]."""
    return mx.take(w, idx.reshape(-1), axis=0).reshape(*idx.shape, *w.shape[1:])


def rowdot(w: mx.array, x: mx.array) -> mx.array:
    """w [T, k, d], x [T, d] -> [T, k]."""
    return (w @ x[:, :, None])[..., 0]


def rowsum(h: mx.array, w: mx.array) -> mx.array:
    """h [T, k], w [T, k, d] -> [T, d]."""
    return (h[:, None, :] @ w)[:, 0]


def scatter(h: mx.array, idx: mx.array, n: int) -> mx.array:
    """h [T, k] at columns idx [T, k] of a zero [T, n]."""
    return mx.put_along_axis(mx.zeros((h.shape[0], n), h.dtype), idx, h, axis=1)


def broadcast_to(a: mx.array, shape: tuple) -> mx.array:
    return mx.broadcast_to(a, shape)


def rows(module: nn.Module, idx: mx.array) -> mx.array:
    """Rows idx of a projection's weight [out, in], whatever its format, at the compute dtype."""
    return quant.rows(module, idx)  # dense, coded (its decoded weight) or quantized (those rows dequantized)


def int4_linear(packed: np.ndarray, scales: np.ndarray, like: mx.array) -> nn.Module:
    """dn's packed int4 sketch (nibbles uint8 [m, k/2] low first, float32 scales [m, k/GROUP], value q - 8) as an
    affine-quantized linear: the nibbles read as uint32 are MLX's 4-bit layout, the bias is -8 * scale. Scales
    and biases at like's dtype."""
    m, half = packed.shape
    lin = nn.QuantizedLinear(2 * half, m, bias=False, group_size=ref.GROUP, bits=4)  # lazy init, replaced below
    s = mx.array(np.asarray(scales, np.float32))
    lin.weight = mx.array(np.ascontiguousarray(packed).view(np.uint32))
    lin.scales, lin.biases = s.astype(like.dtype), (-8 * s).astype(like.dtype)
    return lin


def int4_matmul(x: mx.array, lin: nn.Module) -> mx.array:
    """x [T, k] @ W.T through an int4_linear, in its compute dtype -> [T, m] float32."""
    return lin(x.astype(lin.scales.dtype)).astype(mx.float32)


def bits16(x: mx.array) -> np.ndarray:
    """A 16-bit array's bits, uint16 numpy."""
    return np.array(x.view(mx.uint16))


def _codes(plane: mx.array, k: int) -> mx.array:
    """A split plane uint8 [m, 3k/4] -> its 6-bit fields, uint32 [m, k] (dn.formats.planes' packing)."""
    m = plane.shape[0]
    g = mx.pad(plane.reshape(m, k // 8, 6), [(0, 0), (0, 0), (0, 2)]).view(mx.uint64)  # [m, k/8, 1]
    return ((g >> mx.arange(0, 48, 6, dtype=mx.uint64)) & 63).reshape(m, k).astype(mx.uint32)


def planes_decode(held: dict, k: int, out=None, exact: bool = True) -> mx.array:
    """A router-planes matrix (held: dn.formats.planes.FIELDS arrays) as bf16 [m, k], its exact weights or (exact
    False) its
    sketch's w^; out (torch's scratch) unused."""
    sk = held["sketch"]
    m = sk.shape[0]
    lut = held["lut_hi" if exact else "lut_w"].astype(mx.uint32)
    bits = mx.take(lut[:64] | (lut[64:] << 8), _codes(sk, k))
    if exact:
        bits = bits | _codes(held["rest"], k)
        ptr = np.array(held["esc_ptr"])
        if ptr[-1]:
            rows = mx.array(np.repeat(np.arange(m), np.diff(ptr)))
            bits[rows, held["esc_col"]] = held["esc_bits"].astype(mx.uint32)
    return bits.astype(mx.uint16).view(mx.bfloat16)


def planes_estimate(x, gate, up, name):
    raise NotImplementedError("the split-planes C kernels run on torch's CPU tensors (planes_native is False)")


def planes_sketch(h, down):
    raise NotImplementedError("the split-planes C kernels run on torch's CPU tensors (planes_native is False)")


def planes_held(held: dict) -> dict:
    """A split matrix's held arrays (the C kernels take torch's CPU tensors only)."""
    return held


def scratch(rows: int, cols: int) -> None:
    """MLX arrays are immutable: each decode makes its own (freed after use)."""
    return None


def stack(arrays: list, axis: int) -> mx.array:
    return mx.stack(arrays, axis)


def is_bfloat16(x: mx.array) -> bool:
    return x.dtype == mx.bfloat16


def planes_native(x: mx.array) -> bool:
    """dn/formats/csrc/planes.c takes host pointers; MLX runs its plain path (planes_decode)."""
    return False


def planes_step(x, mats, thresh, c, y0, name, sketch, mask=None):
    raise NotImplementedError("the split-planes C kernel runs on torch's CPU tensors (planes_native is False)")


def native_available(x: mx.array, bundled: mx.array) -> bool:
    """dn/formats/csrc/sparse.c takes host pointers; MLX arrays would need a copy out, so MLX runs its own paths."""
    return False


def native_step(x, bundled, mask, c, y0, name):
    raise NotImplementedError("the C sparse kernel runs on torch's CPU tensors (native_available is False)")


def fused_available(x: mx.array, act: str = "silu") -> bool:
    """The fused sparse kernels run here: Metal on an Apple GPU, silu only."""
    return act == "silu" and mx.metal.is_available() and mx.default_device() == mx.gpu


def fused_step(x, bundled, idx, c, y0, act: str = "silu"):
    """Kept neurons through the two Metal kernels (dn_mlx/sparse.py), which compute silu only."""
    from dn_mlx import sparse

    if act != "silu":
        raise ValueError(f"the Metal sparse kernels compute silu, not {act}; use path 'gather'")

    return sparse._metal_step(x, bundled, idx, c, y0)
