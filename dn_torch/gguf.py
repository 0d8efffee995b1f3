"""GGUF block weights on torch (dn/formats/gguf_blocks.py): a Linear and an Embedding that hold the file's blocks as
they are (uint8 [rows, row_bytes]) and compute on them; no float copy of a whole matrix ever exists.
- Few tokens (decode): the C kernel (dn/formats/csrc/gguf.c) dots x with the blocks, decoding each block as it goes:
  at bfloat16 (lossy already) through x quantized to 8 bits and integer dots where the CPU has AVX512_VNNI
  (gb.native().q8: llama.cpp's route, 1.7-3x the float kernel), else in float32 (exact: the float32 parity gate).
- More tokens (prefill): a block of rows at a time decoded to x's dtype, then torch's matmul.
- An embedding decodes only the rows it looks up; a tied lm_head is a TiedHead over it (the blocks held once).
- Heads give float32 logits at any compute dtype, as dn_torch.quant's.
Without the kernel (DN_NATIVE=0, no compiler, not a CPU tensor) rows decode through the numpy reference
(gguf_blocks.decode), a chunk of rows at a time.
"""

from __future__ import annotations

import mmap

import torch
from torch import nn

from dn.core.errors import DnError
from dn.formats import gguf_blocks as gb
from dn_torch.kernels import threads
from dn_torch.quant import TiedHead

_BLOCK = 1 << 20  # dense elements of rows the prefill path decodes at once
_KERNEL_TOKENS = 64  # above, decoded rows and torch's matmul win (benchmarks/bench_gguf.py, "crossover": ~64-96)


_UNSET = object()
_Q8_OUT = {torch.bfloat16: gb.BF16_X | gb.BF16_Y, torch.float32: gb.BF16_X}  # the integer path's y dtypes


def _lib(raw: torch.Tensor):
    return gb.native() if raw.is_cpu else None


def rows(raw: torch.Tensor, kind: str, idx, dtype: torch.dtype) -> torch.Tensor:
    """Rows idx (a slice, or an index tensor) of blocks raw, decoded to dtype [n, cols]."""
    cols = gb.dense_shape(raw.shape, kind)[1]
    lib = _lib(raw)
    if lib is None:
        part = raw[idx] if isinstance(idx, slice) else raw[idx.to(raw.device)]
        return torch.from_numpy(gb.decode(kind, part.cpu().numpy())).to(raw.device, dtype)
    if isinstance(idx, slice):
        part, idx = raw[idx], None
        n = part.shape[0]
    else:
        idx = idx.to(torch.int64).contiguous()
        part, n = raw, idx.numel()
        if n and (int(idx.min()) < 0 or int(idx.max()) >= raw.shape[0]):
            raise IndexError(f"row index out of range for {raw.shape[0]} rows")
    out = torch.empty(n, cols)
    gb.rows_native(lib, kind, part, idx, out, threads(n * cols))
    return out.to(dtype)


def matmul(x: torch.Tensor, raw: torch.Tensor, kind: str, lib=_UNSET, bias: torch.Tensor | None = None,
           out: torch.dtype | None = None) -> torch.Tensor:
    """x [..., cols] @ W.T (+ bias) for W held as blocks raw [rows, row_bytes] -> [..., rows] at x's dtype, or `out`
    (a head's float32 logits). lib: the kernel library as _lib(raw) gives it (modules keep it: this runs once per
    linear per token, so the kernel is called straight through ctypes; gb.matmul_q8_native checks more)."""
    tid, bw, bb = gb.TYPES[kind]
    m, k = raw.shape[0], raw.shape[1] // bb * bw
    n, out = x.numel() // k, out or x.dtype
    lib = _lib(raw) if lib is _UNSET else lib
    if (lib is not None and n <= _KERNEL_TOKENS and x.dtype == torch.bfloat16 and kind in lib.q8
            and out in _Q8_OUT):
        xb, y = x.contiguous(), torch.empty(*x.shape[:-1], m, dtype=out)
        fused = bias is not None and bias.dtype == out  # added in float before y's one rounding
        gb.check(lib.dn_gguf_matmul_q8(tid, raw.data_ptr(), m, k, xb.data_ptr(), n, y.data_ptr(),
                                       bias.data_ptr() if fused else None, _Q8_OUT[out], threads(m * k)))
        return y if bias is None or fused else y + bias
    if lib is not None and n <= _KERNEL_TOKENS:
        xf = x.float().contiguous()  # no copy where x is float32 and contiguous
        y = torch.empty(*x.shape[:-1], m)
        gb.check(lib.dn_gguf_matmul(tid, raw.data_ptr(), m, k, xf.data_ptr(), n, y.data_ptr(), threads(m * k)))
        y = y.to(out)
        return y if bias is None else y + bias
    x2 = x.reshape(-1, k).to(out)  # a float32 head: rows and products in float32
    y = x2.new_empty(n, m)
    step = max(1, _BLOCK // k)
    for r0 in range(0, m, step):
        w = rows(raw, kind, slice(r0, r0 + step), out)
        y[:, r0:r0 + w.shape[0]] = x2 @ w.T
    y = y.view(*x.shape[:-1], m)
    return y if bias is None else y + bias


class _Blocks(nn.Module):
    """One [rows, cols] matrix held as GGUF blocks of `kind`, the weight buffer filled by the loader."""

    def __init__(self, rows: int, cols: int, kind: str, dtype: torch.dtype):
        super().__init__()
        self.kind, self.compute_dtype, self._lib = gb.type_name(kind), dtype, _UNSET
        self.out = None  # the output dtype, when not x's (a head's float32 logits, as dn_torch.quant's)
        self.register_buffer("weight", torch.empty(gb.stored_shape((rows, cols), kind), dtype=torch.uint8,
                                                   device="meta"))

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None, out: torch.dtype | None = None) -> torch.Tensor:
        if self._lib is _UNSET:  # resolved at the first call, once the loader has placed the weight
            self._lib = _lib(self.weight)
        return matmul(x, self.weight, self.kind, self._lib, bias, out or self.out)

    def rows(self, idx) -> torch.Tensor:
        return rows(self.weight, self.kind, torch.as_tensor(idx), self.compute_dtype)


class GGUFLinear(_Blocks):
    def __init__(self, in_features: int, out_features: int, bias: bool, kind: str, dtype: torch.dtype):
        super().__init__(out_features, in_features, kind, dtype)
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.empty(out_features, device="meta") if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class GGUFEmbedding(_Blocks):
    def __init__(self, num_embeddings: int, embedding_dim: int, kind: str, dtype: torch.dtype):
        super().__init__(num_embeddings, embedding_dim, kind, dtype)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.mapping = None  # an mmap when the loader maps the table from the file (an untied embedding on a CPU)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.rows(ids.reshape(-1)).view(*ids.shape, self.embedding_dim)
        if self.mapping is not None:  # the rows read leave the process (the page cache keeps them): a cold table
            self.mapping.madvise(mmap.MADV_DONTNEED)
        return out

    def as_linear(self, x: torch.Tensor, out: torch.dtype | None = None) -> torch.Tensor:
        return self.matmul(x, out=out)


def swap(model: nn.Module, types: dict, dtype: torch.dtype) -> None:
    """Replace the Linear and Embedding modules named in types (module path -> GGUF block type, spec.gguf) by block
    modules whose buffers stay on meta for the loader; a tied lm_head becomes a TiedHead over the embedding."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    for path, kind in types.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise DnError(f"gguf_quantization names {path}, which this model does not have") from None
        if type(module) is nn.Embedding:
            model.set_submodule(path, GGUFEmbedding(module.num_embeddings, module.embedding_dim, kind, dtype))
        elif type(module) is nn.Linear:
            model.set_submodule(path, GGUFLinear(module.in_features, module.out_features, module.bias is not None,
                                                 kind, dtype))
        else:
            raise DnError(f"gguf_quantization names {path}, a {type(module).__name__}, not a Linear or Embedding")
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if tied and isinstance(embed, GGUFEmbedding):
        model.set_output_embeddings(TiedHead(embed))  # dn_torch.quant's, over any embedding with as_linear
    elif isinstance(head, GGUFLinear):
        head.out = torch.float32  # float32 logits, as TiedHead
