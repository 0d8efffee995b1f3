"""A native GGUF folder (spec.gguf: module path -> block type, dn.formats.gguf_blocks) on MLX.

The types with an exact affine form (gguf_blocks.to_affine: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K) become mlx's
quantized modules, groups of 32, their values exactly the file's; the others (Q2_K, Q3_K, Q6_K: 16-weight
sub-blocks, no such form) are decoded at load, one tensor at a time, and held dense at the compute dtype."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx import nn

from dn.core import tensors
from dn.formats import gguf_blocks
from dn.formats.quant import MODE, scale_dtype
from dn_mlx import ops


def quantize_model(model: nn.Module, types: dict) -> None:
    """Swap in mlx's quantized module (lazy, replaced before anything evaluates it) for each module of an exact
    type; every other module stays as built."""
    def predicate(path: str, _module) -> dict | bool:
        bits = gguf_blocks.AFFINE.get(types.get(path))
        return bits is not None and {"group_size": gguf_blocks.GROUP, "bits": bits, "mode": MODE}

    nn.quantize(model, class_predicate=predicate)


def arrays(name: str, raw: np.ndarray, kind: str, dtype: str) -> list[tuple[str, mx.array]]:
    """One module's blocks (uint8 [rows, row_bytes]) -> the arrays it holds, evaluated: an exact type's packed codes,
    scales and biases (as to_affine gives them, 16-bit or 32-bit, held as dn.formats.quant.scale_dtype says: at a
    32-bit compute dtype as given), or the decoded weight at dtype."""
    if kind not in gguf_blocks.AFFINE:
        return [(name, _evaluated(gguf_blocks.decode(kind, raw), dtype))]
    packed, scales, biases, _, _ = gguf_blocks.to_affine(kind, raw, gguf_blocks.dense_shape(raw.shape, kind))
    path = name.removesuffix(".weight")
    held = scale_dtype(scales.dtype.name, dtype)  # float16 or float32, as dn names them
    return [(name, _evaluated(packed)), (f"{path}.scales", _evaluated(scales, held)),
            (f"{path}.biases", _evaluated(biases, held))]


def _evaluated(a: np.ndarray, dtype: str | None = None) -> mx.array:
    """a (float values when dtype is given) as an MLX array at dtype, converted in numpy (dn.core.tensors: no
    32-bit MLX copy lives beside it) and evaluated."""
    if dtype is not None:
        a = tensors.convert(a, a.dtype.name, dtype)
    out = ops._array(a)
    mx.eval(out)
    return out
