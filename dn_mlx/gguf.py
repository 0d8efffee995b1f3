"""A native GGUF folder (spec.gguf: module path -> block type, dn.formats.gguf_blocks) on MLX.

The types with an exact affine form (gguf_blocks.to_affine: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K) become mlx's
quantized modules, groups of 32, their values exactly the file's. The others (Q2_K, Q3_K, Q6_K: 16-weight
sub-blocks, no such form) are held as the file's own blocks (uint8 [rows, row_bytes]) and decoded at use with mlx
ops, bit for bit as gguf_blocks.decode, a chunk of rows at a time (BlocksLinear, BlocksEmbedding).

This decode is the pure-MLX twin of a Metal kernel that would later replace _Blocks.matmul and rows (decoding
inside the matmul's tiles, as llama.cpp's do): the kernel goes beside it, tested against it."""

from __future__ import annotations

import mmap

import mlx.core as mx
import numpy as np
from mlx import nn
from mlx.utils import tree_map_with_path

from dn.core import tensors
from dn.formats import gguf_blocks
from dn.formats.quant import MODE, scale_dtype
from dn_mlx import ops

BLOCKS = ("Q2_K", "Q3_K", "Q6_K")  # held as their blocks
CHUNK = 1 << 20  # weights a matmul decodes at a time (4 MB of float32; its peak about 3x that): not the matrix
F32 = mx.float32


def _f16(b: mx.array) -> mx.array:
    """uint8 [n, 2] (a little-endian float16's bytes) -> float32 [n, 1]."""
    h = b[:, :1].astype(mx.uint16) | (b[:, 1:2].astype(mx.uint16) << 8)
    return h.view(mx.float16).astype(F32)


def _split(x: mx.array, width: int) -> mx.array:
    """uint8 [..., m] -> its 8 / width fields of `width` bits, low bits first: [..., 8 / width, m]."""
    return (x[..., None, :] >> mx.arange(0, 8, width, dtype=mx.uint8)[:, None]) & ((1 << width) - 1)


def _grid(kind: str, b: mx.array) -> mx.array:
    """Blocks uint8 [n, block_bytes] -> float32 [n, 256]: gguf_blocks._grid's fields and arithmetic. Every product
    is exact in float32 (a float16 d times a scale of <= 8 bits times a code of <= 6: <= 24 significant bits), so
    the values are decode()'s however a fused kernel orders them (Q2_K's one sum rounds once either way)."""
    n = b.shape[0]
    if kind == "Q2_K":  # scales[16], qs[64], d, dmin
        sc = b[:, :16]
        codes = _split(b[:, 16:80].reshape(n, 2, 32), 2).reshape(n, 16, 16).astype(F32)
        scale, mn = _f16(b[:, 80:82]) * (sc & 15).astype(F32), -(_f16(b[:, 82:84]) * (sc >> 4).astype(F32))
        return (scale[..., None] * codes + mn[..., None]).reshape(n, -1)
    if kind == "Q3_K":  # hmask[32], qs[64], scales[12], d
        low = _split(b[:, 32:96].reshape(n, 2, 32), 2).reshape(n, 16, 16)
        codes, zero = low | (_split(b[:, :32], 1).reshape(n, 16, 16) << 2), 4
        s = _split(b[:, 96:104], 4).reshape(n, 16) | (_split(b[:, 104:108], 2).reshape(n, 16) << 4)
        scale = _f16(b[:, 108:110]) * (s.astype(F32) - 32)
    else:  # Q6_K: ql[128], qh[64], scales[16] int8, d
        codes = _split(b[:, :128].reshape(n, 2, 64), 4).reshape(n, 8, 32)
        codes, zero = (codes | (_split(b[:, 128:192].reshape(n, 2, 32), 2).reshape(n, 8, 32) << 4)).reshape(
            n, 16, 16), 32
        scale = _f16(b[:, 208:210]) * b[:, 192:208].view(mx.int8).astype(F32)
    return (scale[..., None] * (codes.astype(F32) - zero)).reshape(n, -1)


def decode(kind: str, raw: mx.array) -> mx.array:
    """Raw blocks uint8 [..., row_bytes] -> float32 [..., row_weights], as gguf_blocks.decode gives them. Not
    mx.compile'd: on MLX's CPU the compiled decode was 10-30% slower at the same peak memory."""
    return _grid(kind, raw.reshape(-1, gguf_blocks.TYPES[kind][2])).reshape(*raw.shape[:-1], -1)


class _Blocks(nn.Module):
    """A weight of dense shape [rows, cols] held as its GGUF blocks, `weight` uint8 [rows, row_bytes]."""

    def __init__(self, like: nn.Module, kind: str, compute, head: bool):
        super().__init__()
        rows, self.cols = like.weight.shape
        self.weight = mx.zeros(gguf_blocks.stored_shape((rows, self.cols), kind), mx.uint8)  # the file's replace it
        if "bias" in like:
            self.bias = like.bias
        self.kind, self.compute, self.head = kind, compute, head

    def rows(self, idx=None) -> mx.array:
        """Rows idx (all: None) decoded, float32; only those rows are decoded."""
        return decode(self.kind, self["weight"] if idx is None else self["weight"][idx])

    def matmul(self, x: mx.array) -> mx.array:
        """x [..., cols] @ W.T in float32 (x cast), W decoded CHUNK weights at a time; float32 [..., rows]. At a 16-bit
        compute dtype the weights are thus not rounded: no worse than a dense bf16 model."""
        w, step, x = self["weight"], max(1, CHUNK // self.cols), x.astype(F32)
        out = []
        for i in range(0, w.shape[0], step):  # each chunk's blocks wait on the last product: one chunk at a time
            blocks = w[i:i + step] if not out else mx.depends(w[i:i + step], out[-1])
            out.append(x @ decode(self.kind, blocks).T)
        return out[0] if len(out) == 1 else mx.concatenate(out, -1)


class BlocksLinear(_Blocks):
    """A Linear held as blocks; as the head (lm_head), float32 logits as dn_mlx.quant's _Head gives."""

    def __call__(self, x: mx.array) -> mx.array:
        y = self.matmul(x)
        y = y + self["bias"] if "bias" in self else y
        return y if self.head else y.astype(x.dtype)


class BlocksEmbedding(_Blocks):
    """An Embedding held as blocks: the looked-up rows decoded, at the compute dtype; as a tied head, float32
    logits."""

    def __call__(self, ids: mx.array) -> mx.array:
        return self.rows(ids).astype(self.compute)

    def as_linear(self, x: mx.array) -> mx.array:
        return self.matmul(x)


class MappedEmbedding(nn.Module):
    """An embedding left in the file (a pipeline rank's, dn.runtime.pipeline.Stage.lookup), never in MLX's
    allocator: a call reads the rows it looks up from the mapped blocks and computes them as the held module would
    (BlocksEmbedding's decode; an exact type's arrays() and quant._Embedding's dequantize), so the values are a
    loaded table's, bit for bit; the pages read then leave the process (the page cache keeps them). Not a tied
    head: the rank that needs one holds it."""

    def __init__(self, raw: np.ndarray, kind: str, dtype: str):
        super().__init__()
        self.raw, self.kind, self.dtype, self.compute = raw, kind, dtype, ops.DTYPES[dtype]  # plain attributes
        # a loaded table's scales come in one dtype for all rows, which at a 16-bit compute dtype sets their rounding
        self.side = None if kind in BLOCKS or dtype == "float32" else _side(raw, kind)
        self.gpu = self.compute.size <= 2 and mx.default_device().type != mx.cpu  # quant._compute_at's cast
        self.raw._mmap.madvise(mmap.MADV_DONTNEED)

    def __call__(self, ids: mx.array) -> mx.array:
        idx = np.array(ids)
        rows = self.raw[idx.reshape(-1)]  # a copy: the mapped pages may go
        self.raw._mmap.madvise(mmap.MADV_DONTNEED)
        if self.kind in BLOCKS:
            w = decode(self.kind, mx.array(rows))
        else:
            packed, scales, biases = (a for _, a in arrays("w", rows, self.kind, self.dtype, self.side))
            if self.gpu:
                scales, biases = scales.astype(self.compute), biases.astype(self.compute)
            w = mx.dequantize(packed, scales.astype(F32), biases.astype(F32), group_size=gguf_blocks.GROUP,
                              bits=gguf_blocks.AFFINE[self.kind], mode=MODE)
        return w.astype(self.compute).reshape(*idx.shape, -1)


def quantize_model(model: nn.Module, types: dict, dtype: str) -> None:
    """Swap in, for each module of a GGUF type (lazy, replaced by load_weights before anything evaluates them),
    mlx's quantized module for an exact type, BlocksLinear or BlocksEmbedding for the others (computing at dtype)."""
    def blocks(path: str, m: nn.Module) -> nn.Module:
        if types.get(path) not in BLOCKS or "weight" not in m:  # not held here: dn_mlx.pipeline.cut's Identity
            return m
        held = BlocksEmbedding if isinstance(m, nn.Embedding) else BlocksLinear
        return held(m, types[path], ops.DTYPES[dtype], path == "lm_head")

    model.update_modules(tree_map_with_path(blocks, model.leaf_modules(), is_leaf=nn.Module.is_module))

    def predicate(path: str, module) -> dict | bool:
        bits = gguf_blocks.AFFINE.get(types.get(path))
        return bits is not None and "weight" in module and {"group_size": gguf_blocks.GROUP, "bits": bits, "mode": MODE}

    nn.quantize(model, class_predicate=predicate)


def arrays(name: str, raw: np.ndarray, kind: str, dtype: str, side=None) -> list[tuple[str, mx.array]]:
    """One module's blocks (uint8 [rows, row_bytes]) -> the arrays it holds, evaluated: an exact type's packed codes,
    scales and biases (as to_affine gives them, 16-bit or 32-bit, or at side where given, held as
    dn.formats.quant.scale_dtype says: at a 32-bit compute dtype as given), or the blocks themselves."""
    if kind not in gguf_blocks.AFFINE:
        return [(name, _evaluated(raw))]
    packed, scales, biases = _to_affine(kind, raw, side)
    path = name.removesuffix(".weight")
    held = scale_dtype(scales.dtype.name, dtype)  # float16 or float32, as dn names them
    return [(name, _evaluated(packed)), (f"{path}.scales", _evaluated(scales, held)),
            (f"{path}.biases", _evaluated(biases, held))]


def _parts(kind: str, raw: np.ndarray, weights: int = 1 << 22):
    """gguf_blocks.to_affine a chunk of `weights` at a time (its unpacked codes of a whole embedding would take
    hundreds of MB at the load's peak): (packed, scales, biases) per chunk."""
    cols = gguf_blocks.dense_shape(raw.shape, kind)[1]
    step = max(1, weights // cols)
    for r in range(0, len(raw), step):
        yield gguf_blocks.to_affine(kind, raw[r:r + step], (len(raw[r:r + step]), cols))[:3]


def _to_affine(kind: str, raw: np.ndarray, side=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The whole of raw through _parts; scales and biases float16 only where every chunk's are (or at side)."""
    parts = list(_parts(kind, raw))
    if side is None:
        side = np.result_type(*[a for p in parts for a in p[1:]])  # float16 -> float32: exact
    return tuple(np.concatenate([p[i] if i == 0 else p[i].astype(side) for p in parts]) for i in range(3))


def _side(raw: np.ndarray, kind: str) -> np.dtype:
    """The dtype _to_affine gives the whole of raw's scales and biases, read a chunk at a time up to the first
    that needs float32."""
    wide = (np.result_type(*p[1:]) for p in _parts(kind, raw))
    return next((t for t in wide if t == np.float32), np.dtype(np.float16))


def _evaluated(a: np.ndarray, dtype: str | None = None) -> mx.array:
    """a (float values when dtype is given) as an MLX array at dtype, converted in numpy (dn.core.tensors: no
    32-bit MLX copy lives beside it) and evaluated."""
    if dtype is not None:
        a = tensors.convert(a, a.dtype.name, dtype)
    out = ops._array(a)
    mx.eval(out)
    return out
