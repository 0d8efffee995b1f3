"""Residency on MLX: one block of MLP neurons laid out as MLX computes on it, and the ops the resident MLP
(dn/runtime/residency.py) runs on blocks. dn_torch/resident.py has the same functions.

Layouts: dense: a bundle [BLOCK, 3, d] at the compute dtype; affine: mlx's own (packed uint32, scales and biases
as stored, or at the compute dtype when that is 16-bit), gate and up joined along rows, down along columns.
Each layer's result is evaluated before the next layer runs, so the blocks read for it are freed at once
(lazily, every layer's cold blocks would be alive until the logits are)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx import nn

from dn.model.spec import ModelSpec
from dn.runtime import residency
from dn_mlx import ops

_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def layout_key(spec: ModelSpec, dtype: str) -> str:
    if spec.quant is None:
        return "dense"
    return f"mlx-q{spec.quant['bits']}g{spec.quant['group_size']}"


def _np(a: mx.array) -> np.ndarray:
    if a.dtype == mx.bfloat16:
        return np.array(a.view(mx.uint16))
    return np.array(a)


def _mx(a: np.ndarray, dtype) -> mx.array:
    """numpy -> mx at dtype; uint16 arrays are bf16 bits."""
    return mx.array(a).view(mx.bfloat16) if a.dtype == np.uint16 else mx.array(a)


def block_arrays(slices: dict, spec: ModelSpec, dtype: str) -> list[tuple[np.ndarray, int]]:
    """One block's stored slices (dn.runtime.residency.block_slices) -> its tensors as MLX computes on them, as numpy
    (bf16 as uint16 bits), each with the axis along which blocks join."""
    dt = _DTYPES[dtype]

    def arr(name):
        a, stored = slices[name]
        x = _mx(a, None) if stored == "BF16" else mx.array(a)
        return x

    if spec.quant is None:
        b = mx.stack([arr("gate_proj.weight"), arr("up_proj.weight"), arr("down_proj.weight").T], axis=1)
        return [(_np(b.astype(dt)), 0)]
    out = []
    for proj in ("gate_proj", "up_proj", "down_proj"):
        ax = 1 if proj == "down_proj" else 0
        out.append((np.array(arr(f"{proj}.weight").view(mx.uint32)).view(np.int32), ax))
        for k in ("scales", "biases"):
            a = arr(f"{proj}.{k}")
            out.append((_np(a.astype(dt) if dt.size <= 2 else a), ax))
    return out


def part_info(spec: ModelSpec, dtype: str) -> dict:
    q = spec.quant or {}
    return {"kind": "dense" if spec.quant is None else "mlx", "dtype": dtype, "d": spec.architecture.hidden_size,
            "bits": q.get("bits"), "group_size": q.get("group_size"), "act": spec.architecture.mlp_act}


class Part:
    def __init__(self, arrays: list[np.ndarray], info: dict):
        self.info, self.kind = info, info["kind"]
        ts = [_mx(a, None) for a in arrays]
        if self.kind == "dense":
            self.bundled = ts[0]
        else:
            self.mats = [(ts[i].view(mx.uint32), ts[i + 1], ts[i + 2]) for i in (0, 3, 6)]

    def matmul(self, j: int, x: mx.array) -> mx.array:
        w, s, b = self.mats[j]
        return mx.quantized_matmul(x, w, s, b, transpose=True, group_size=self.info["group_size"],
                                   bits=self.info["bits"])


def make_part(arrays: list[np.ndarray], info: dict) -> Part:
    return Part(arrays, info)


def acts(part: Part, x: mx.array) -> mx.array:
    """x [T, d] -> act(gate x) * (up x), [T, k]: the model's activation (SiLU, Gemma's GELU tanh; a cold file
    written before it was recorded is SiLU)."""
    name = part.info.get("act", "silu")
    if part.kind == "dense":
        b = part.bundled
        return ops.act(name, x @ b[:, 0].T) * (x @ b[:, 1].T)
    return ops.act(name, part.matmul(0, x)) * part.matmul(1, x)


def down(part: Part, h: mx.array) -> mx.array:
    if part.kind == "dense":
        return h @ part.bundled[:, 2]
    return part.matmul(2, h)


def settle(y: mx.array) -> mx.array:
    mx.eval(y)
    return y


def to_numpy(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def from_numpy(a: np.ndarray, like: mx.array) -> mx.array:
    return mx.array(a).astype(like.dtype)


def concat(ts: list[mx.array]) -> mx.array:
    return mx.concatenate(ts)



class ResidentModule(nn.Module):
    """Binds a dn.runtime.residency.ResidentMLP to nn.Module (the model calls it as its MLP)."""

    def __init__(self, mlp: residency.ResidentMLP):
        super().__init__()
        object.__setattr__(self, "_resident", mlp)  # not a parameter tree: it holds blocks

    @property
    def resident(self) -> residency.ResidentMLP:
        return self._resident

    def __call__(self, x: mx.array) -> mx.array:
        return self.resident(x)


class Placeholder(nn.Module):
    """Stands in for an MLP while the rest of the model loads (no parameters: its stored tensors are dropped)."""

    def __call__(self, x):  # pragma: no cover - replaced before use
        raise RuntimeError("residency placeholder called")


def install(model, runtime: residency.Runtime, sparse_layers=None) -> None:
    import sys

    residency.install(model, runtime, sys.modules[__name__], ResidentModule, sparse_layers)
