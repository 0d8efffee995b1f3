"""Lossless codec on MLX: a pure-MLX decoder (any device) and Metal kernels (decode, fused decode+GEMV),
bit-exact against dn.codec; attach() keeps a model's projection weights coded and decodes one layer at a
time, in one launch, when the layer runs.

Kernel bodies live in metal/*.metal (see docs/metal.md); on Linux they are checked by compiling them as
C++ (tests/test_metal_host.py), on Apple silicon they run through mx.fast.metal_kernel.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx import nn

from dn import codec
from dn.errors import DnError

_MAX_BATCH = 16  # matvec's fused kernel keeps B accumulators per thread
_MAX_KERNEL_MAXLEN = 13  # the LUT is staged in threadgroup memory (2 << MAXLEN bytes of 32 KiB)
_PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_MX_DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16}


class _Packed(nn.Module):
    """A dn.codec.Pack as MLX arrays: only the coded buffers (and the tiny per-tensor table)."""

    def __init__(self, p: codec.Pack):
        super().__init__()
        self.words, self.offsets = mx.array(p.words), mx.array(p.offsets)
        self.luts, self.raw = mx.array(p.luts), mx.array(p.raw)
        self.table = mx.array(p.table)
        # Python ints, not arrays: kept out of the parameter tree (a Module files tuples as children).
        object.__setattr__(self, "_meta", (p.lanes, p.steps, p.maxlen, p.dtype, p.n,
                                           tuple(map(tuple, p.table.tolist()))))

    @property
    def lanes(self) -> int:
        return self._meta[0]


def _pack(enc: codec.EncodedTensor) -> _Packed:
    if not isinstance(enc, codec.EncodedTensor):
        raise DnError(f"codec: expected an EncodedTensor, got {type(enc).__name__}")
    codec.verify(enc, "<argument>")
    return _Packed(codec.pack({"": enc}))


def _on_metal() -> bool:
    return mx.metal.is_available() and mx.default_device() == mx.gpu


# ---- pure-MLX decode ------------------------------------------------------------------------------

def _stream_meta(p: _Packed) -> tuple[mx.array, mx.array, mx.array, int]:
    """Per stream: (word base, LUT base, symbol count) as uint32/uint32/int32 arrays, and max count."""
    lanes, steps, maxlen, _, _, table = p._meta
    t = np.array(table, np.int64).reshape(-1, 4)
    streams = np.diff(np.append(t[:, 0], p.offsets.size))
    tid = np.repeat(np.arange(len(t)), streams)
    local = np.arange(p.offsets.size) - t[tid, 0]
    first = local // lanes * lanes * steps + local % lanes  # element index within its tensor
    count = np.clip(-(-(t[tid, 3] - first) // lanes), 0, steps)
    return (mx.array(t[tid, 1].astype(np.uint32)), mx.array((tid << maxlen).astype(np.uint32)),
            mx.array(count.astype(np.int32)), int(count.max(initial=0)))


def _join(sym: mx.array, raw: mx.array, dtype: str) -> mx.array:
    s, r = sym.astype(mx.uint16), raw.astype(mx.uint16)
    if dtype == "bfloat16":
        return ((r & 0x80) << 8) | (s << 7) | (r & 0x7F)
    return (s << 8) | r


def _decode_ops(p: _Packed) -> mx.array:
    """All lane streams at once, one step at a time -> uint16 [n] (the pack's tensors back to back)."""
    lanes, steps, maxlen, dtype, _, table = p._meta
    word_base, lut_base, count, n_steps = _stream_meta(p)
    luts = p.luts.astype(mx.uint32)
    pos = p.offsets  # bit position within the stream's tensor (uint32: encode caps a tensor at 2**32 bits)
    syms = []
    for s in range(n_steps):
        w = word_base + (pos >> 5)
        o = pos & 31
        # The 32 bits at pos; (w1 >> 1) >> (31 - o) avoids a shift by 32 when o == 0.
        window = (p.words[w] << o) | ((p.words[w + 1] >> 1) >> (31 - o))
        entry = luts[lut_base + (window >> (32 - maxlen))]
        syms.append((entry & 0xFF).astype(mx.uint8))
        pos = pos + mx.where(s < count, entry >> 8, 0)  # finished lanes stay put (and in bounds)
    n_streams = p.offsets.size
    pad = [mx.zeros((n_streams,), mx.uint8)] * (steps - n_steps)
    # [steps, tiles, lanes] -> [tiles, steps, lanes] is element order t*T + s*lanes + l.
    flat = mx.stack(syms + pad).reshape(steps, n_streams // lanes, lanes).transpose(1, 0, 2).reshape(-1)
    tile = lanes * steps
    parts = [flat[first // lanes * tile: first // lanes * tile + n] for first, _, _, n in table]
    sym = parts[0] if len(parts) == 1 else mx.concatenate(parts)
    return _join(sym, p.raw, dtype)


# ---- Metal kernels --------------------------------------------------------------------------------

# (inputs, outputs, template arguments) of each kernel; metal/shim/driver.cpp mirrors them (a test checks).
_IO = {
    "codec_decode": (("words", "offsets", "luts", "raw", "table"), ("out",),
                     ("LANES", "STEPS", "MAXLEN", "NT", "BF16")),
    "codec_matvec": (("words", "offsets", "lut", "raw", "x"), ("partial",),
                     ("LANES", "STEPS", "MAXLEN", "BF16", "K", "N", "B", "SLOTS")),
}


def _source(name: str) -> str:
    return resources.files("metal").joinpath(name).read_text()


@functools.cache
def _kernel(name: str):
    inputs, outputs, _ = _IO[name]
    return mx.fast.metal_kernel(name=f"dn_{name}", input_names=list(inputs), output_names=list(outputs),
                                source=_source(f"{name}.metal"), header=_source("codec_common.h"))


def _launch(name: str, inputs: list, params: dict, threads: int, lanes: int, shape: tuple, dtype) -> mx.array:
    """One launch: threadgroups of `lanes` threads, one per tile."""
    return _kernel(name)(inputs=inputs, template=[(k, params[k]) for k in _IO[name][2]],
                         grid=(threads, 1, 1), threadgroup=(lanes, 1, 1),
                         output_shapes=[shape], output_dtypes=[dtype])[0]


def _kernel_ok(p: _Packed) -> bool:
    lanes, _, maxlen, *_ = p._meta
    return lanes % 32 == 0 and lanes <= 1024 and maxlen <= _MAX_KERNEL_MAXLEN


def _decode_metal(p: _Packed) -> mx.array:
    lanes, steps, maxlen, dtype, n, table = p._meta
    params = {"LANES": lanes, "STEPS": steps, "MAXLEN": maxlen, "NT": len(table), "BF16": dtype == "bfloat16"}
    inputs = [p.words, p.offsets, p.luts, p.raw, p.table]
    return _launch("codec_decode", inputs, params, p.offsets.size, lanes, (n,), mx.uint16)


def _decode_packed(p: _Packed) -> mx.array:
    return _decode_metal(p) if _on_metal() and _kernel_ok(p) else _decode_ops(p)


def _matvec_slots(lanes: int, steps: int, k: int) -> int:
    """Rows a tile can touch: the partial output keeps this many per tile."""
    return (lanes * steps - 1) // k + 2


@functools.cache
def _reduce_index(rows: int, k: int, lanes: int, steps: int) -> tuple[mx.array, mx.array]:
    """Indices into the [tiles * SLOTS] partial rows: row r sums its shares from the tiles covering it."""
    tile, slots = lanes * steps, _matvec_slots(lanes, steps, k)
    r = np.arange(rows)
    t0, t1 = r * k // tile, ((r + 1) * k - 1) // tile
    span = int((t1 - t0).max(initial=0)) + 1
    t = t0[:, None] + np.arange(span)[None, :]  # [rows, span]
    valid = t <= t1[:, None]
    idx = np.where(valid, t * slots + r[:, None] - t * tile // k, 0)
    return mx.array(idx.astype(np.int32)), mx.array(valid)


def _matvec_reduce(partial: mx.array, rows: int, k: int, lanes: int, steps: int) -> mx.array:
    """partial float32 [tiles * SLOTS, B] -> y float32 [B, rows]."""
    idx, valid = _reduce_index(rows, k, lanes, steps)
    shares = mx.where(valid[..., None], partial[idx], 0.0)  # [rows, span, B]
    return shares.sum(axis=1).T


def _matvec_metal(p: _Packed, shape: tuple[int, int], x: mx.array) -> mx.array:
    lanes, steps, maxlen, dtype, n, _ = p._meta
    rows, k = shape
    b = x.shape[0]
    slots = _matvec_slots(lanes, steps, k)
    params = {"LANES": lanes, "STEPS": steps, "MAXLEN": maxlen, "BF16": dtype == "bfloat16", "K": k, "N": n,
              "B": b, "SLOTS": slots}
    partial = _launch("codec_matvec", [p.words, p.offsets, p.luts, p.raw, x.astype(mx.float32)], params,
                      p.offsets.size, lanes, (p.offsets.size // lanes * slots, b), mx.float32)
    return _matvec_reduce(partial, rows, k, lanes, steps).astype(x.dtype)


# ---- public API (dn_torch.codec has the same functions) --------------------------------------------

def decode(enc: codec.EncodedTensor, device=None) -> mx.array:
    """Bits (uint16, original shape) of one coded tensor: the Metal kernel on Metal, pure MLX elsewhere."""
    p = _pack(enc)
    with mx.stream(device or mx.default_device()):
        return _decode_packed(p).reshape(enc.shape)


def decode_reference(enc: codec.EncodedTensor, device=None) -> mx.array:
    """The pure-MLX path, on any device."""
    p = _pack(enc)
    with mx.stream(device or mx.default_device()):
        return _decode_ops(p).reshape(enc.shape)


def _weight(bits: mx.array, stored: str, dtype) -> mx.array:
    return bits.view(_MX_DTYPES[stored]).astype(dtype)


def matvec(enc: codec.EncodedTensor, x: mx.array) -> mx.array:
    """y = x @ W.T for x [B, in], B <= 16: the fused decode+GEMV kernel on Metal, else decode then matmul."""
    if len(enc.shape) != 2:
        raise DnError(f"codec: matvec needs a 2-D weight, got shape {tuple(enc.shape)}")
    if x.ndim != 2 or x.shape[1] != enc.shape[1] or not 1 <= x.shape[0] <= _MAX_BATCH:
        raise DnError(f"codec: matvec needs x of shape [B <= {_MAX_BATCH}, {enc.shape[1]}], "
                      f"got {tuple(x.shape)}")
    if not mx.issubdtype(x.dtype, mx.floating):
        raise DnError(f"codec: matvec needs a floating x, got {x.dtype}")
    p = _pack(enc)
    if _on_metal() and _kernel_ok(p) and enc.shape[1] >= p.lanes and enc.n < 2**31:  # N is an int template
        return _matvec_metal(p, enc.shape, x)
    w = _weight(_decode_packed(p), enc.dtype, x.dtype).reshape(enc.shape)
    return x @ w.T


class _Current:
    """The decoded bits of the one layer being run, shared by that layer's projections: a layer is decoded
    in one launch when its first projection runs and dropped when the next layer's first one does."""

    def __init__(self):
        self.packed, self.bits = None, None

    def get(self, packed: _Packed) -> mx.array:
        if self.packed is not packed:
            self.packed, self.bits = packed, _decode_packed(packed)
        return self.bits


class CodecLinear(nn.Module):
    """nn.Linear whose weight is a slice of its layer's decoded pack, then the same matmul as nn.Linear, so
    outputs are bit-identical to the dense layer. `dtype_ref` is a 0-d array that model.set_dtype casts
    like the dense weight, so the decoded weight takes the dtype the dense one would have had."""

    def __init__(self, packed: _Packed, current: _Current, start: int, shape, bias: mx.array | None, dtype=None):
        super().__init__()
        self.dtype_ref = mx.zeros((), dtype or _MX_DTYPES[packed._meta[3]])
        if bias is not None:
            self.bias = bias
        # Plain attributes: the pack belongs to the layer's parameters (layer.dn_codec), counted once.
        for k, v in (("_packed", packed), ("_current", current), ("_start", start), ("_shape", tuple(shape))):
            object.__setattr__(self, k, v)

    @property
    def weight(self) -> mx.array:
        """The decoded weight (its layer's pack is decoded once, when the layer's first projection asks)."""
        n = self._shape[0] * self._shape[1]
        bits = self._current.get(self._packed)[self._start:self._start + n]
        return _weight(bits, self._packed._meta[3], self.dtype_ref.dtype).reshape(self._shape)

    def __call__(self, x: mx.array) -> mx.array:
        w = self.weight
        if "bias" in self:
            return mx.addmm(self["bias"], x, w.T)
        return x @ w.T


def attach(model, model_dir: Path, spec) -> None:
    """Replace every coded q/k/v/o/gate/up/down projection of model.model.layers by a CodecLinear; each
    layer's coded tensors form one pack (layer.dn_codec), decoded in one launch when the layer runs. A layer's
    coded tensors are read and packed before the next layer's are read."""
    index = codec.load_index(Path(model_dir))
    current, used = _Current(), set()
    for i, layer in enumerate(model.model.layers):
        names = [(f"model.layers.{i}.{path}.weight", path) for path in _PROJ]
        names = [(name, path) for name, path in names if name in index]
        if not names:
            continue
        encs = codec.load_model_codec(Path(model_dir), [name for name, _ in names])
        pk = codec.pack(encs)
        del encs
        layer.dn_codec = packed = _Packed(pk)
        for (name, path), (_, start, shape) in zip(names, pk.slices):
            parent_name, attr = path.split(".")
            parent = getattr(layer, parent_name)
            old = getattr(parent, attr)
            if tuple(old.weight.shape) != tuple(shape):
                raise DnError(f"codec: {name} has shape {tuple(shape)}, the model expects "
                              f"{tuple(old.weight.shape)}")
            # the dense weight it replaces has the compute dtype already (attach may run after set_dtype)
            setattr(parent, attr, CodecLinear(packed, current, start, shape, old.get("bias"), old.weight.dtype))
            used.add(name)
    missing = sorted(set(index) - used)
    if missing:
        raise DnError(f"codec: coded tensor {missing[0]} is not a projection this model has "
                      f"({len(missing)} unmatched)")
