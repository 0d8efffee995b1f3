"""dn.runtime.backend.Ops on MLX: the array ops dn's backend-neutral layers are written over, and the Metal sparse
kernels (dn_mlx/kernels.py). The C kernels take host pointers, which MLX arrays would need a copy out for: MLX runs
its own paths for those (no native_sparse, no native_planes)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx import nn

from dn.formats import sparse as ref
from dn_mlx import quant
from dn_mlx.kernels import fused_available as fused_available
from dn_mlx.kernels import fused_step as fused_step

CAPABILITIES = frozenset({"fused_sparse"})
CPU_DTYPES: dict = {}  # MLX's CPU kernels run every format at float32 as fast as at bfloat16
# dtype names (dn.core.tensors.File.dtype: floats by dn's name, the rest by safetensors') -> MLX's: the one table
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16, "U32": mx.uint32, "I32": mx.int32,
          "I64": mx.int64, "U8": mx.uint8, "I8": mx.int8}
# dn's activation names (dn.core.activations) -> MLX's functions
_ACTS = {"silu": nn.silu, "gelu_tanh": nn.gelu_approx}


def device() -> mx.Device:
    return mx.default_device()  # DN_MLX_DEVICE pins it (dn_mlx/model.py)


def hold(module: nn.Module, name: str, array: mx.array) -> None:
    setattr(module, name, array)


def from_numpy(a: np.ndarray, like: mx.array) -> mx.array:
    return mx.array(np.ascontiguousarray(a))  # MLX's default device


def to_numpy(a: mx.array) -> np.ndarray:
    return np.array(a)


def float32(x: mx.array) -> mx.array:
    return x.astype(mx.float32)


def cast(x: mx.array, like: mx.array) -> mx.array:
    return x.astype(like.dtype)


def is_dense(module: nn.Module) -> bool:
    return type(module) is nn.Linear


def weight_like(module: nn.Module) -> mx.array:
    if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):  # scales may be held 16-bit
        return mx.zeros((), getattr(module, "_compute", module.scales.dtype))
    leaves = nn.utils.tree_flatten(module.parameters())
    return next(v for _, v in leaves if mx.issubdtype(v.dtype, mx.floating))


def act(name: str, x: mx.array) -> mx.array:
    return _ACTS[name](x)


def abs(x: mx.array) -> mx.array:
    return mx.abs(x)


def zero_where(x: mx.array, mask: mx.array) -> mx.array:
    return mx.where(mask, mx.zeros((), x.dtype), x)


def topk_mask(s: mx.array, k: int) -> mx.array:
    idx = mx.argpartition(-s, k - 1, axis=1)[:, :k]
    return mx.put_along_axis(mx.zeros(s.shape, mx.bool_), idx, mx.array(True), axis=1)


def kept_indices(mask: mx.array) -> mx.array:
    """On the host: MLX has no nonzero."""
    m = np.array(mask)
    return mx.array(np.nonzero(m)[1].reshape(m.shape[0], -1).astype(np.uint32))


def take(a: mx.array, idx: mx.array) -> mx.array:
    return mx.take(a, idx)


def take_rows(w: mx.array, idx: mx.array) -> mx.array:
    return mx.take(w, idx.reshape(-1), axis=0).reshape(*idx.shape, *w.shape[1:])


def rowdot(w: mx.array, x: mx.array) -> mx.array:
    return (w @ x[:, :, None])[..., 0]


def rowsum(h: mx.array, w: mx.array) -> mx.array:
    return (h[:, None, :] @ w)[:, 0]


def scatter(h: mx.array, idx: mx.array, n: int) -> mx.array:
    return mx.put_along_axis(mx.zeros((h.shape[0], n), h.dtype), idx, h, axis=1)


def broadcast_to(a: mx.array, shape: tuple) -> mx.array:
    return mx.broadcast_to(a, shape)


def rows(module: nn.Module, idx: mx.array) -> mx.array:
    return quant.rows(module, idx)  # dense, coded (its decoded weight) or quantized (those rows dequantized)


def int4_linear(packed: np.ndarray, scales: np.ndarray, like: mx.array) -> nn.Module:
    """MLX's own affine 4-bit layout."""
    m, half = packed.shape
    lin = nn.QuantizedLinear(2 * half, m, bias=False, group_size=ref.GROUP, bits=4)  # lazy init, replaced below
    s = mx.array(np.asarray(scales, np.float32))
    lin.weight = mx.array(np.ascontiguousarray(packed).view(np.uint32))
    lin.scales, lin.biases = s.astype(like.dtype), (-8 * s).astype(like.dtype)
    return lin


def int4_matmul(x: mx.array, lin: nn.Module) -> mx.array:
    return lin(x.astype(lin.scales.dtype)).astype(mx.float32)


def bits16(x: mx.array) -> np.ndarray:
    return np.array(x.view(mx.uint16))


def _numpy(a: mx.array) -> np.ndarray:
    """dn.core.tensors' convention: bf16, which numpy lacks, as its uint16 bits. _array undoes it."""
    return bits16(a) if a.dtype == mx.bfloat16 else np.array(a)


def _array(a: np.ndarray) -> mx.array:
    """uint16 arrives as bf16's bits (no dtype in DTYPES is stored as uint16 but bf16)."""
    out = mx.array(a)
    return out.view(mx.bfloat16) if out.dtype == mx.uint16 else out


def _codes(plane: mx.array, k: int) -> mx.array:
    """A split plane uint8 [m, 3k/4] -> its 6-bit fields, uint32 [m, k] (dn.formats.planes' packing)."""
    m = plane.shape[0]
    g = mx.pad(plane.reshape(m, k // 8, 6), [(0, 0), (0, 0), (0, 2)]).view(mx.uint64)  # [m, k/8, 1]
    return ((g >> mx.arange(0, 48, 6, dtype=mx.uint64)) & 63).reshape(m, k).astype(mx.uint32)


def planes_decode(held: dict, k: int, out=None, exact: bool = True) -> mx.array:
    """A new array each time (out is None: scratch() has none)."""
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


def scratch(rows: int, cols: int) -> None:
    return None  # MLX arrays are immutable: each decode makes its own (freed after use)


def stack(arrays: list, axis: int) -> mx.array:
    return mx.stack(arrays, axis)


def contiguous(x: mx.array) -> mx.array:
    return mx.contiguous(x)


def is_bfloat16(x: mx.array) -> bool:
    return x.dtype == mx.bfloat16
