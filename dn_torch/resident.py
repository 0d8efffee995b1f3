"""Residency on torch: an affine block of MLP neurons laid out as torch computes on it, and blocks read together
made into tensors; the resident MLP (dn/runtime/residency/mlp.py) does the rest, over dn_torch.ops. A dense block
is laid out by dn itself (a bundle [BLOCK, 3, d] at the compute dtype). dn_mlx/resident.py has the same names.

Affine layouts (`layout`): each projection in the layout dn_torch.quant computes in at that dtype (torch's int4 or
int8 CPU kernel layouts at 16-bit compute, else mlx's), with the axis along which blocks join, so that k blocks
read together make one matrix."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dn.model.spec import ModelSpec
from dn.runtime import residency
from dn_torch import gguf, quant
from dn_torch import ops as ops  # re-exported: the array ops the resident MLP computes with

GGUF = True  # lays out a native GGUF folder's blocks (dn_mlx's runs the GGUF's widening under a budget)
JOIN_IN_WORKER = True  # a prefetch thread may make tensors of blocks and lay them out (join(held=True))


def layout(spec: ModelSpec, dtype: str) -> tuple[str, str]:
    """A quantized folder's block layout at dtype: (kind: int4, int8, mlx or gguf; the cold file's key for it). A
    GGUF's blocks are computed on as the file has them (dn_torch.gguf), at any dtype."""
    if spec.gguf:
        return "gguf", "gguf"
    q = spec.quant
    kind = quant._kernel_layout(residency.BLOCK, q["bits"], q["group_size"], ops.DTYPES[dtype], torch.device("cpu"))
    if kind == "int4" and spec.architecture.hidden_size % quant._int4_block_rows():
        kind = "mlx"  # the down projection's rows must fill whole int4 blocks to be joined along its columns
    kind = kind or "mlx"
    return kind, f"int4r{quant._int4_block_rows()}" if kind == "int4" else f"{kind}-q{q['bits']}g{q['group_size']}"


def _quantized(slices: dict, proj: str, spec: ModelSpec, dtype: torch.dtype) -> quant.QuantizedLinear:
    w = slices[f"{proj}.weight"][0]
    s, b = slices[f"{proj}.scales"][0], slices[f"{proj}.biases"][0]
    q = spec.quant
    rows, cols = w.shape[0], w.shape[1] * 32 // q["bits"]
    m = quant.QuantizedLinear(cols, rows, False, q["bits"], q["group_size"], dtype)
    m.weight = ops._tensor(w.view(np.int32)).view(torch.uint32)
    m.scales, m.biases = ops._tensor(s), ops._tensor(b)  # BF16 is stored as its uint16 bits
    m.prepare(dtype)
    return m


def _axes(kind: str, role: str) -> list[int]:
    """Axis along which blocks join, for (weight, scales[, biases]) of gate/up ('rows') or down ('cols')."""
    rows = role == "rows"
    return {"int4": [0, 1] if rows else [1, 0], "int8": [1, 1, 1] if rows else [0, 0, 0],
            "mlx": [0, 0, 0] if rows else [1, 1, 1]}[kind]


def block_arrays(slices: dict, proj: str, spec: ModelSpec, dtype: str) -> list[tuple[np.ndarray, int]]:
    """Projection proj of one affine block's stored slices (dn.runtime.residency.block_slices) -> the tensors
    dn_torch.quant.QuantizedLinear computes with (weight, scales[, biases]), as numpy (bf16 as uint16 bits), each
    with the axis along which blocks join."""
    kind = layout(spec, dtype)[0]
    if kind == "gguf":  # raw blocks: rows of gate and up; the down projection's columns of whole blocks, joined
        return [(slices[f"{proj}.weight"][0], 0)]  # block after block, so a run of them is contiguous in the file
    m = _quantized(slices, proj, spec, ops.DTYPES[dtype])
    ts = [m.weight, m.scales] + ([m.biases] if m.biases is not None else [])
    if kind == "int4" and proj == "down_proj":  # [d, k/2] in blocks of B rows, column-major inside a block
        ts[0] = ts[0].view(-1, residency.BLOCK, quant._int4_block_rows() // 2)
    return [(ops._numpy(t), ax) for t, ax in zip(ts, _axes(kind, "cols" if proj == "down_proj" else "rows"))]


def join(arrays: list[np.ndarray], info: dict, held: bool = False):
    """k blocks read together (numpy views of the cold file, joined) -> tensors: a bundle [k*BLOCK, 3, d], or the
    three projections' (weight, scales, biases) as dn_torch.quant.affine_matmul takes them (int4: no biases), or a
    GGUF's (blocks, type). held: blocks kept resident (copied at load, computed on every token)."""
    ts = [ops._tensor(a).contiguous() for a in arrays]  # joined along a later axis: strided views of the file
    kind = info["kind"]
    if kind == "dense":
        return ts[0]
    if kind == "gguf":  # the down projection comes block after block [k*d, w]: [k, d, w] where read per token (a
        d = info["d"]  # view of the file, no copy), rows [d, k*w] where held (one kernel call)
        down = ts[2].view(-1, d, ts[2].shape[1])
        ts[2] = down.permute(1, 0, 2).reshape(d, -1) if held else down
        return [[w, t, None] for w, t in zip(ts, info["types"])]
    per = 2 if kind == "int4" else 3
    mats = [ts[i * per:(i + 1) * per] for i in range(3)]
    if kind == "int4":
        mats = [[w, s, None] for w, s in mats]
        mats[2][0] = mats[2][0].reshape(info["d"], -1)
    return [[w.view(torch.uint32), s, b] for w, s, b in mats] if kind == "mlx" else mats


def matmul(x: torch.Tensor, w: torch.Tensor, s, b: torch.Tensor | None, info: dict) -> torch.Tensor:
    if info["kind"] == "gguf" and w.dim() == 3:  # blocks [k, d, w] of the down projection: one call per block,
        n = x.shape[-1] // w.shape[0]  # summed in float32
        y = sum(gguf.matmul(x[..., i * n:(i + 1) * n], w[i], s, out=torch.float32) for i in range(w.shape[0]))
        return y.to(x.dtype)
    if info["kind"] == "gguf":
        return gguf.matmul(x, w, s)
    return quant.affine_matmul(x.contiguous(), w, s, b, info["bits"], info["group_size"])


def settle(y: torch.Tensor) -> torch.Tensor:
    return y  # eager: the blocks read for a layer are freed when it returns


def concat(ys: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(ys)


class ResidentModule(nn.Module):
    """A layer's MLP under residency. Left empty by the load (the stored MLP tensors then find no slot);
    dn.runtime.residency's Runtime.install binds its ResidentMLP as `resident`, a plain attribute (not a
    submodule: it holds blocks, not parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resident(x)
