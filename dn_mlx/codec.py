"""Lossless codec on MLX: a pure-MLX decoder (any device) and a Metal kernel (Apple GPU), both
bit-exact against dn.codec; attach() keeps a model's layer weights coded and decodes one layer at a
time, just before the layer runs."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx import nn

from dn import codec

_KERNEL_SOURCE = Path(__file__).resolve().parent.parent / "metal" / "codec_decode.metal"
_kernel = None


class PackedLayer(nn.Module):
    """A dn.codec.Pack as MLX arrays: only the coded buffers are resident."""

    def __init__(self, p: codec.Pack):
        super().__init__()
        self.lanes, self.steps, self.maxlen, self.dtype, self.n = p.lanes, p.steps, p.maxlen, p.dtype, p.n
        self.slices = p.slices
        self.words, self.offsets = mx.array(p.words), mx.array(p.offsets)
        self.luts, self.raw, self.table = mx.array(p.luts), mx.array(p.raw), mx.array(p.table.astype(np.int64))

    def stream_meta(self):
        """Per stream: (bit position, LUT base, output base, count), as dn.codec.stream_meta."""
        t, s_total = self.table, self.offsets.size
        streams = mx.concatenate([t[1:, 0], mx.array([s_total], mx.int64)]) - t[:, 0]
        tid = mx.array(np.repeat(np.arange(t.shape[0]), np.array(streams)))
        local = mx.arange(s_total, dtype=mx.int64) - t[tid, 0]
        lane, tile_start = local % self.lanes, local // self.lanes * self.lanes * self.steps
        bitpos = self.offsets.astype(mx.int64) + 32 * t[tid, 1]
        count = mx.clip(-((-(t[tid, 3] - tile_start - lane)) // self.lanes), 0, self.steps)
        return bitpos, tid.astype(mx.int64) << self.maxlen, t[tid, 2] + tile_start + lane, count

    def decode(self) -> mx.array:
        """-> uint16 bits [n]."""
        if _metal_ok():
            return _decode_metal(self)
        return _decode_mlx(self)


def _join(sym: mx.array, raw: mx.array, dtype: str) -> mx.array:
    s, r = sym.astype(mx.uint16), raw.astype(mx.uint16)
    if dtype == "bfloat16":
        return ((r & 0x80) << 8) | (s << 7) | (r & 0x7F)
    return (s << 8) | r


def _decode_mlx(p: PackedLayer) -> mx.array:
    pos, lut_base, out_base, count = p.stream_meta()
    words = p.words.astype(mx.uint64)
    luts = p.luts.astype(mx.int64)
    sym = mx.zeros(p.n + 1, dtype=mx.uint8)  # slot n takes finished streams
    shift_base, mask = 64 - p.maxlen, (1 << p.maxlen) - 1
    for s in range(int(count.max().item()) if count.size else 0):
        valid = count > s
        w = pos >> 5
        window = (words[w] << 32) | words[w + 1]
        idx = ((window >> (shift_base - (pos & 31)).astype(mx.uint64)) & mask).astype(mx.int64)
        entry = luts[lut_base + idx]
        sym[mx.where(valid, out_base + s * p.lanes, p.n)] = (entry & 0xFF).astype(mx.uint8)
        pos = pos + mx.where(valid, entry >> 8, 0)
    return _join(sym[:p.n], p.raw, p.dtype)


def _metal_ok() -> bool:
    return mx.metal.is_available() and mx.default_device() == mx.gpu


def _decode_metal(p: PackedLayer) -> mx.array:
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.metal_kernel(
            name="dn_codec_decode",
            input_names=["words", "luts", "raw", "bitpos", "lut_base", "out_base", "count"],
            output_names=["out"], source=_KERNEL_SOURCE.read_text())
    pos, lut_base, out_base, count = p.stream_meta()
    streams = pos.size
    threads = -(-streams // p.lanes) * p.lanes
    (out,) = _kernel(inputs=[p.words, p.luts, p.raw, pos.astype(mx.uint32), lut_base.astype(mx.uint32),
                             out_base.astype(mx.uint32), count.astype(mx.uint32)],
                     template=[("LANES", p.lanes), ("MAXLEN", p.maxlen), ("BF16", p.dtype == "bfloat16"),
                               ("STREAMS", streams)],
                     grid=(threads, 1, 1), threadgroup=(p.lanes, 1, 1),
                     output_shapes=[(p.n,)], output_dtypes=[mx.uint16])
    return out


def decode(enc: codec.EncodedTensor, device=None) -> mx.array:
    """Bits (uint16, original shape) of one coded tensor; Metal on Apple GPUs, pure MLX elsewhere."""
    with mx.stream(device or mx.default_device()):
        return PackedLayer(codec.pack({"": enc})).decode().reshape(enc.shape)


def decode_reference(enc: codec.EncodedTensor, device=None) -> mx.array:
    """The pure-MLX path, on any device."""
    with mx.stream(device or mx.default_device()):
        return _decode_mlx(PackedLayer(codec.pack({"": enc}))).reshape(enc.shape)


class _Current:
    """The one decoded layer held at a time (shared by a model's coded linears)."""

    def __init__(self, compute_dtype):
        self.packed, self.weights, self.dtype = None, None, compute_dtype

    def get(self, packed: PackedLayer) -> mx.array:
        if self.packed is not packed:
            bits = packed.decode()
            w = bits.view(mx.bfloat16 if packed.dtype == "bfloat16" else mx.float16)
            self.packed, self.weights = packed, w.astype(self.dtype)  # exact upcast, as set_dtype does
        return self.weights


class CodecLinear(nn.Module):
    """nn.Linear whose weight is decoded from its layer's pack on first use in each forward."""

    def __init__(self, packed: PackedLayer, current: _Current, start: int, shape, bias):
        super().__init__()
        self._packed, self._current, self._start, self._shape = packed, current, start, tuple(shape)
        if bias is not None:
            self.bias = bias

    def __call__(self, x):
        n = self._shape[0] * self._shape[1]
        w = self._current.get(self._packed)[self._start:self._start + n].reshape(self._shape)
        if "bias" in self:
            return mx.addmm(self["bias"], x, w.T)  # the same ops as mlx.nn.Linear
        return x @ w.T


def attach(model, model_dir: Path, spec) -> None:
    """Replace the coded projections of every decoder layer by CodecLinear."""
    encs = codec.load_model_codec(model_dir)
    dtype = model.model.embed_tokens.weight.dtype
    current = _Current(dtype)
    for i, layer in enumerate(model.model.layers):
        p = codec.pack({k: v for k, v in encs.items() if k.startswith(f"model.layers.{i}.")})
        packed = PackedLayer(p)
        layer.dn_codec = packed
        for name, start, shape in p.slices:
            parent, attr = name.removeprefix(f"model.layers.{i}.").removesuffix(".weight").rsplit(".", 1)
            module = layer
            for part in parent.split("."):
                module = getattr(module, part)
            old = getattr(module, attr)
            setattr(module, attr, CodecLinear(packed, current, start, shape, old.get("bias")))


def matvec(enc: codec.EncodedTensor, x: mx.array) -> mx.array:
    """y = x @ W.T for x [B, in]: decode then matmul (a fused Metal kernel is future work)."""
    w = decode(enc).view(mx.bfloat16 if enc.dtype == "bfloat16" else mx.float16)
    return x @ w.astype(x.dtype).T
