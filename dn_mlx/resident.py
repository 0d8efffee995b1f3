"""Residency on MLX: an affine block of MLP neurons in mlx's own layout, and blocks read together made into
arrays; the resident MLP (dn/runtime/residency/mlp.py) does the rest, over dn_mlx.ops. dn_torch/resident.py has
the same names.

A dense block is laid out by dn itself (a bundle [BLOCK, 3, d] at the compute dtype). An affine one is mlx's:
packed uint32 weights, scales and biases as stored (or at the compute dtype when that is 16-bit); gate and up join
along rows, down along columns. Each layer's result is evaluated before the next layer runs (settle), so the
blocks read for it are freed at once: lazily, every layer's cold blocks would be alive until the logits are."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx import nn

from dn.model.spec import ModelSpec
from dn_mlx import ops as ops  # re-exported: the array ops the resident MLP computes with
from dn_mlx.quant import affine_matmul


def layout(spec: ModelSpec, dtype: str) -> tuple[str, str]:
    """(kind, the cold file's key): mlx's layout, whatever the compute dtype."""
    return "mlx", f"mlx-q{spec.quant['bits']}g{spec.quant['group_size']}"


def block_arrays(slices: dict, proj: str, spec: ModelSpec, dtype: str) -> list[tuple[np.ndarray, int]]:
    """Projection proj of one affine block's stored slices (dn.runtime.residency.block_slices) -> weight, scales,
    biases as mx.quantized_matmul takes them, as numpy (bf16 as uint16 bits), with the axis blocks join along."""
    dt, ax = ops.DTYPES[dtype], 1 if proj == "down_proj" else 0
    w = mx.array(slices[f"{proj}.weight"][0]).view(mx.uint32)
    sides = [ops._array(slices[f"{proj}.{k}"][0]) for k in ("scales", "biases")]  # BF16 is stored as uint16
    return [(np.array(w).view(np.int32), ax)] + [(ops._numpy(a.astype(dt) if dt.size <= 2 else a), ax) for a in sides]


def join(arrays: list[np.ndarray], info: dict, held: bool = False):
    """k blocks read together (numpy, joined) -> arrays: a bundle [k*BLOCK, 3, d], or (weight, scales, biases)
    per projection (held: kept resident; the layout is the same)."""
    arrs = [ops._array(a) for a in arrays]
    if info["kind"] == "dense":
        return arrs[0]
    return [(arrs[i].view(mx.uint32), arrs[i + 1], arrs[i + 2]) for i in (0, 3, 6)]


def matmul(x: mx.array, w: mx.array, s: mx.array, b: mx.array, info: dict) -> mx.array:
    return affine_matmul(x, w, s, b, info["bits"], info["group_size"])  # float32 sums on a CPU


def settle(y: mx.array) -> mx.array:
    mx.eval(y)
    return y


def concat(ys: list[mx.array]) -> mx.array:
    return mx.concatenate(ys)


class ResidentModule(nn.Module):
    """Stands in for a layer's MLP: no parameters while the model loads (the stored MLP tensors are dropped);
    dn.runtime.residency's Runtime.install then sets `resident` (not an array: MLX keeps it out of the parameter
    tree)."""

    def __call__(self, x: mx.array) -> mx.array:
        return self.resident(x)
