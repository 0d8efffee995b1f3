"""Residency on torch: one block of MLP neurons laid out as torch computes on it, and the three ops the
resident MLP (dn/runtime/residency.py) runs on blocks. dn_mlx/resident.py has the same functions.

Layouts (`layout_key`): dense: a bundle [BLOCK, 3, d] at the compute dtype; affine: each projection in the
layout dn_torch.quant computes in at that dtype (torch's int4 or int8 CPU kernel layouts at 16-bit compute,
else mlx's), with the axis along which blocks join, so that k blocks read together make one matrix."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dn.model.spec import ModelSpec
from dn.runtime import residency
from dn_torch import ops, quant

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NP = {torch.bfloat16: np.uint16, torch.float16: np.float16}


def _kind(spec: ModelSpec, dtype: str) -> str:
    if spec.quant is None:
        return "dense"
    q = spec.quant
    d = spec.architecture.hidden_size
    kind = quant._kernel_layout(residency.BLOCK, q["bits"], q["group_size"], _DTYPES[dtype], torch.device("cpu"))
    if kind == "int4" and d % quant._int4_block_rows():
        return "mlx"  # the down projection's rows must fill whole int4 blocks to be joined along its columns
    return kind or "mlx"


def layout_key(spec: ModelSpec, dtype: str) -> str:
    k = _kind(spec, dtype)
    if k == "int4":
        return f"int4r{quant._int4_block_rows()}"
    return k if k == "dense" else f"{k}-q{spec.quant['bits']}g{spec.quant['group_size']}"


def _np(t: torch.Tensor) -> np.ndarray:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.view(torch.int32).numpy() if t.dtype == torch.uint32 else t.numpy()


def _torch(a: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = torch.from_numpy(a)
    return t.view(dtype) if dtype is not None else t


def _quantized(slices: dict, proj: str, spec: ModelSpec, dtype: torch.dtype) -> quant.QuantizedLinear:
    w = slices[f"{proj}.weight"][0]
    s, sd = slices[f"{proj}.scales"]
    b, _ = slices[f"{proj}.biases"]
    q = spec.quant
    rows, cols = w.shape[0], w.shape[1] * 32 // q["bits"]
    m = quant.QuantizedLinear(cols, rows, False, q["bits"], q["group_size"], dtype)
    st = torch.bfloat16 if sd == "BF16" else None
    m.weight = _torch(w.view(np.int32)).view(torch.uint32)
    m.scales = _torch(s, st) if st else _torch(s)
    m.biases = _torch(b, st) if st else _torch(b)
    m.prepare(dtype)
    return m


def _axes(kind: str, role: str) -> list[int]:
    """Axis along which blocks join, for (weight, scales[, biases]) of gate/up ('rows') or down ('cols')."""
    rows = role == "rows"
    return {"int4": [0, 1] if rows else [1, 0], "int8": [1, 1, 1] if rows else [0, 0, 0],
            "mlx": [0, 0, 0] if rows else [1, 1, 1]}[kind]


def block_arrays(slices: dict, spec: ModelSpec, dtype: str) -> list[tuple[np.ndarray, int]]:
    """One block's stored slices (dn.runtime.residency.block_slices) -> its tensors as torch computes on them, as numpy
    (bf16 as uint16 bits), each with the axis along which blocks join."""
    dt = _DTYPES[dtype]
    kind = _kind(spec, dtype)
    if kind == "dense":
        from dn.core.tensors import bf16_to_f32

        f = {k: bf16_to_f32(a) if d == "BF16" else a.astype(np.float32) for k, (a, d) in slices.items()}
        b = np.stack([f["gate_proj.weight"], f["up_proj.weight"], f["down_proj.weight"].T], axis=1)
        return [(_np(torch.from_numpy(b).to(dt)), 0)]
    out = []
    for proj in ("gate_proj", "up_proj", "down_proj"):
        m = _quantized(slices, proj, spec, dt)
        ts = [m.weight, m.scales] + ([m.biases] if m.biases is not None else [])
        if kind == "int4" and proj == "down_proj":  # [d, k/2] in blocks of B rows, column-major inside a block
            big = quant._int4_block_rows()
            ts[0] = ts[0].view(-1, residency.BLOCK, big // 2)
        out += [(_np(t), ax) for t, ax in zip(ts, _axes(kind, "cols" if proj == "down_proj" else "rows"))]
    return out


def part_info(spec: ModelSpec, dtype: str) -> dict:
    q = spec.quant or {}
    return {"kind": _kind(spec, dtype), "dtype": dtype, "d": spec.architecture.hidden_size,
            "bits": q.get("bits"), "group_size": q.get("group_size"), "act": spec.architecture.mlp_act}


class Part:
    """k blocks joined: a bundle [k*BLOCK, 3, d], or three quantized matrices (weight, scales, biases)."""

    def __init__(self, arrays: list[np.ndarray], info: dict):
        ts = [_torch(a).contiguous() for a in arrays]  # joined along a later axis: strided views of the file
        ts = [t.view(torch.bfloat16) if t.dtype == torch.uint16 else t for t in ts]  # bf16 travels as its bits
        self.info, self.kind = info, info["kind"]
        if self.kind == "dense":
            self.bundled = ts[0]
            return
        per = 2 if self.kind == "int4" else 3
        mats = [ts[i * per:(i + 1) * per] for i in range(3)]
        if self.kind == "int4":
            mats = [[w, s, None] for w, s in mats]
            mats[2][0] = mats[2][0].reshape(info["d"], -1)
        if self.kind == "mlx":
            mats = [[w.view(torch.uint32), s, b] for w, s, b in mats]
        self.mats = mats

    def matmul(self, j: int, x: torch.Tensor) -> torch.Tensor:
        w, s, b = self.mats[j]
        return quant.affine_matmul(x, w, s, b, self.info["bits"], self.info["group_size"])


def make_part(arrays: list[np.ndarray], info: dict) -> Part:
    return Part(arrays, info)


def acts(part: Part, x: torch.Tensor) -> torch.Tensor:
    """x [T, d] -> act(gate x) * (up x), [T, k]: the model's activation (SiLU, Gemma's GELU tanh; a cold file
    written before it was recorded is SiLU)."""
    name = part.info.get("act", "silu")
    if part.kind == "dense":
        b = part.bundled
        return ops.act(name, x @ b[:, 0].T) * (x @ b[:, 1].T)
    return ops.act(name, part.matmul(0, x)) * part.matmul(1, x)


def down(part: Part, h: torch.Tensor) -> torch.Tensor:
    """h [T, k] -> the down projection of those neurons, [T, d]."""
    if part.kind == "dense":
        return h @ part.bundled[:, 2]
    return part.matmul(2, h.contiguous())


def settle(y: torch.Tensor) -> torch.Tensor:
    return y  # eager: the blocks read for a layer are freed when it returns


def to_numpy(a: torch.Tensor) -> np.ndarray:
    return a.detach().float().cpu().numpy()


def from_numpy(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(a, device=like.device).to(like.dtype)


def concat(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(ts)



class ResidentModule(nn.Module):
    """Binds a dn.runtime.residency.ResidentMLP to nn.Module (the model calls it as its MLP)."""

    def __init__(self, mlp: residency.ResidentMLP):
        super().__init__()
        self._mlp = (mlp,)   # not a submodule: it holds blocks, not parameters

    @property
    def resident(self) -> residency.ResidentMLP:
        return self._mlp[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resident(x)


class Placeholder(nn.Module):
    """Stands in for an MLP while the rest of the model loads (its stored tensors find no slot)."""

    def forward(self, x):  # pragma: no cover - replaced before use
        raise RuntimeError("residency placeholder called")


def install(model, runtime: residency.Runtime, sparse_layers=None) -> None:
    import sys

    residency.install(model, runtime, sys.modules[__name__], ResidentModule, sparse_layers)
