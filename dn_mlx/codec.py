"""Lossless codec on MLX. The stored format (dn.formats.lossless, Huffman): a pure-MLX decoder (any device) and Metal
kernels (decode, fused decode+GEMV), bit-exact against dn.formats.lossless. The runtime: attach() converts each coded
projection at load into the fixed-width layout fixed4 (dn.formats.fixed4) and decodes it per call with a
vectorized pure-MLX path (logits bit-identical to dense), or, on a GPU with DN_CODEC_FUSED=1, for a few rows
of x, runs a fused fixed4 decode+GEMV kernel (Metal: metal/codec_fixed4.metal; CUDA: dn_mlx/_cuda_fixed4.py).

Kernel bodies are checked on Linux by compiling them as C++ (tests/test_metal_host.py,
tests/test_metal_fixed4_host.py); on a GPU they run through mx.fast.metal_kernel / mx.fast.cuda_kernel.
"""

from __future__ import annotations

import functools
import os
from importlib import resources
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx import nn

from dn.core.errors import DnError
from dn.formats import fixed4, lossless
from dn_mlx import _cuda_fixed4 as cuda_fixed4
from dn_mlx.ops import DTYPES

_MAX_BATCH = 16  # matvec's fused kernel keeps B accumulators per thread
_MAX_KERNEL_MAXLEN = 13  # the LUT is staged in threadgroup memory (2 << MAXLEN bytes of 32 KiB)
_PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class _Packed(nn.Module):
    """A dn.formats.lossless.Pack as MLX arrays: only the coded buffers (and the tiny per-tensor table)."""

    def __init__(self, p: lossless.Pack):
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


def _pack(enc: lossless.EncodedTensor) -> _Packed:
    if not isinstance(enc, lossless.EncodedTensor):
        raise DnError(f"codec: expected an EncodedTensor, got {type(enc).__name__}")
    lossless.verify(enc, "<argument>")
    return _Packed(lossless.pack({"": enc}))


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

def decode(enc: lossless.EncodedTensor, device=None) -> mx.array:
    """Bits (uint16, original shape) of one coded tensor: the Metal kernel on Metal, pure MLX elsewhere."""
    p = _pack(enc)
    with mx.stream(device or mx.default_device()):
        return _decode_packed(p).reshape(enc.shape)


def decode_reference(enc: lossless.EncodedTensor, device=None) -> mx.array:
    """The pure-MLX path, on any device."""
    p = _pack(enc)
    with mx.stream(device or mx.default_device()):
        return _decode_ops(p).reshape(enc.shape)


def _weight(bits: mx.array, stored: str, dtype) -> mx.array:
    return bits.view(DTYPES[stored]).astype(dtype)


def matvec(enc: lossless.EncodedTensor, x: mx.array) -> mx.array:
    """y = x @ W.T for x [B, in], B <= 16: the fused decode+GEMV kernel on Metal, else decode then matmul."""
    if len(enc.shape) != 2:
        raise DnError(f"codec: matvec needs a 2-D weight, got shape {tuple(enc.shape)}")
    _check_x(enc.shape, x)
    p = _pack(enc)
    if _on_metal() and _kernel_ok(p) and enc.shape[1] >= p.lanes and enc.n < 2**31:  # N is an int template
        return _matvec_metal(p, enc.shape, x)
    w = _weight(_decode_packed(p), enc.dtype, x.dtype).reshape(enc.shape)
    return x @ w.T


# ---- runtime layout fixed4 (dn.formats.fixed4): what attach() holds and runs -------------------------------

_FIXED4_TG = 256  # fused kernel: threads per threadgroup (8 simdgroups / warps, one row each)


class Fixed4(nn.Module):
    """One coded 2-D weight in the layout fixed4 as MLX arrays, zero-padded to whole words (8 weights):
    nibbles uint32 [ceil(n/8)], raw uint32 [2 ceil(n/8)], table uint64 [2] (the 16 symbol bytes), esc_index
    int32 [e], esc_symbol uint8 [e]. With `fused`, also each escape's row, column and float32 weight for the
    fused kernel's second pass (12 bytes per escape, about 0.03% of weights)."""

    def __init__(self, rt: fixed4.Lossless, fused: bool = False):
        super().__init__()
        if len(rt.shape) != 2:
            raise DnError(f"codec: the fixed4 runtime needs a 2-D weight, got shape {rt.shape}")
        words = -(-rt.n // 8)
        self.nibbles = mx.array(_padded(rt.nibbles, 4 * words).view(np.uint32))
        self.raw = mx.array(_padded(rt.raw, 8 * words).view(np.uint32))
        self.table = mx.array(rt.table.view(np.uint64))
        self.esc_index, self.esc_symbol = mx.array(rt.esc_index), mx.array(rt.esc_symbol)
        if fused and rt.esc_index.size:
            rows, cols = np.divmod(rt.esc_index, rt.shape[1])
            bits = lossless.join(rt.esc_symbol, rt.raw[rt.esc_index], rt.dtype).astype(np.uint16)
            self.esc_rows, self.esc_cols = mx.array(rows.astype(np.int32)), mx.array(cols.astype(np.int32))
            self.esc_weight = mx.array(fixed4.to_float32(bits, rt.dtype))
        object.__setattr__(self, "_meta", (rt.dtype, tuple(rt.shape), rt.n, int(rt.esc_index.size)))


def _padded(a: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros(size, np.uint8)
    out[:a.size] = a
    return out


def from_encoded(enc: lossless.EncodedTensor, fused: bool = False) -> Fixed4:
    """A stored tensor -> its runtime layout on MLX (decoded with numpy once, at load)."""
    if not isinstance(enc, lossless.EncodedTensor):
        raise DnError(f"codec: expected an EncodedTensor, got {type(enc).__name__}")
    lossless.verify(enc, "<argument>")
    return Fixed4(fixed4.from_encoded(enc), fused)


@functools.cache
def _pairs(bf16: bool):
    """Elementwise, fused by mx.compile: one nibble byte and its two raw bytes -> the two weights' 16 bits as
    one uint32 (even element low). The 16-symbol table is two uint64 words: rank r's symbol is byte r % 8 of
    word r // 8 (no gather). Escapes decode with symbol table[15] = 0; _decode_fixed4 adds theirs."""
    at = (7, 23) if bf16 else (8, 24)

    def f(nib, raw16, table):
        b = nib.astype(mx.uint64)
        lo, hi = b & 15, b >> 4
        s_lo = (mx.where(lo > 7, table[1], table[0]) >> ((lo & 7) << 3)) & 0xFF
        s_hi = (mx.where(hi > 7, table[1], table[0]) >> ((hi & 7) << 3)) & 0xFF
        sym = ((s_lo << at[0]) | (s_hi << at[1])).astype(mx.uint32)
        r = raw16.astype(mx.uint32)
        r = (r & 0xFF) | ((r & 0xFF00) << 8)  # the two raw bytes, one per 16-bit half
        return sym | (((r & 0x00800080) << 8) | (r & 0x007F007F) if bf16 else r)

    return mx.compile(f)  # traced per shape (a model has a few); shapeless kernels run 3-8x slower on the CPU


def _decode_fixed4(f: Fixed4) -> mx.array:
    """-> uint16 bits [n], bit-exact (dn.formats.fixed4.decode)."""
    dtype, _, n, e = f._meta
    bits = _pairs(dtype == "bfloat16")(f.nibbles.view(mx.uint8), f.raw.view(mx.uint16), f.table)
    bits = bits.view(mx.uint16)[:n]
    if e:  # an escape's symbol field decoded as 0: OR its symbol in (a plain scatter, any device and dtype)
        shift = 7 if dtype == "bfloat16" else 8
        bits[f.esc_index] = bits[f.esc_index] | (f.esc_symbol.astype(mx.uint16) << shift)
    return bits


def decode_fixed4(f: Fixed4) -> mx.array:
    """Bits (uint16, the weight's shape) of a Fixed4, pure MLX on the default device."""
    return _decode_fixed4(f).reshape(f._meta[1])


def _gpu() -> str | None:
    """'metal' or 'cuda' when MLX computes on that GPU: the fused fixed4 kernel's backends."""
    if mx.default_device() != mx.gpu:
        return None
    if mx.metal.is_available():
        return "metal"
    return "cuda" if mx.cuda.is_available() else None


def _fixed4_inputs(f: Fixed4, x: mx.array) -> list:
    return [f.nibbles, f.raw, f.table.view(mx.uint8), x.astype(mx.float32)]


def _fixed4_params(f: Fixed4, b: int) -> dict:
    rows, k = f._meta[1]
    return {"K": k, "ROWS": rows, "B": b, "BF16": f._meta[0] == "bfloat16"}


@functools.cache
def _fixed4_metal():
    return mx.fast.metal_kernel(name="dn_codec_fixed4", input_names=["nibbles", "raw", "table", "x"],
                                output_names=["y"], source=_source("codec_fixed4.metal"),
                                header=_source("codec_common.h"))


def _launch_fixed4(backend: str, inputs: list, params: dict, threads: int) -> mx.array:
    """One fused launch: `threads` = whole threadgroups of _FIXED4_TG, one row per 32 threads."""
    if backend == "metal":
        kernel = _fixed4_metal()
    else:
        kernel = cuda_fixed4.kernel()
    return kernel(inputs=inputs, template=list(params.items()), grid=(threads, 1, 1),
                  threadgroup=(_FIXED4_TG, 1, 1), output_shapes=[(params["B"], params["ROWS"])],
                  output_dtypes=[mx.float32])[0]


def _matvec_fixed4(f: Fixed4, x: mx.array, backend: str) -> mx.array:
    """x [B <= 16, K] -> float32 [B, rows]: the fused kernel (escapes as 0), then the escapes' corrections."""
    rows, _ = f._meta[1]
    per_group = _FIXED4_TG // 32
    threads = -(-rows // per_group) * _FIXED4_TG
    y = _launch_fixed4(backend, _fixed4_inputs(f, x), _fixed4_params(f, x.shape[0]), threads)
    if f._meta[3]:
        y = y.at[:, f.esc_rows].add(x[:, f.esc_cols].astype(mx.float32) * f.esc_weight)
    return y


def matvec_fixed4(f: Fixed4, x: mx.array) -> mx.array:
    """y = x @ W.T for x [B <= 16, in]: the fused kernel on a GPU (Metal or CUDA), else decode then matmul;
    float32 accumulation, the result in x's dtype."""
    _check_x(f._meta[1], x)
    backend = _gpu()
    if backend is not None:
        if f._meta[3] and "esc_rows" not in f:
            raise DnError("codec: this Fixed4 was built without the fused kernel's escape terms (fused=True)")
        return _matvec_fixed4(f, x, backend).astype(x.dtype)
    w = _weight(_decode_fixed4(f), f._meta[0], x.dtype).reshape(f._meta[1])
    return x @ w.T


def _check_x(shape, x: mx.array) -> None:
    if x.ndim != 2 or x.shape[1] != shape[1] or not 1 <= x.shape[0] <= _MAX_BATCH:
        raise DnError(f"codec: matvec needs x of shape [B <= {_MAX_BATCH}, {shape[1]}], got {tuple(x.shape)}")
    if not mx.issubdtype(x.dtype, mx.floating):
        raise DnError(f"codec: matvec needs a floating x, got {x.dtype}")


def _fused() -> str | None:
    """The GPU whose fused kernel CodecLinear uses: only with DN_CODEC_FUSED=1 (as dn_torch.codec), since it
    changes the logits' last bits."""
    return _gpu() if os.environ.get("DN_CODEC_FUSED") == "1" else None


class CodecLinear(nn.Module):
    """nn.Linear over a fixed4 weight (dn_codec). Its decoded weight runs the exact nn.Linear expression, so
    outputs are bit-identical to the dense layer. With DN_CODEC_FUSED=1 on a GPU, inputs of at most 16 rows
    (decode steps) take the fused kernel instead (float32 sums in another order: within KERNEL tolerances, not
    bit-identical). `dtype_ref` is a 0-d array that model.set_dtype casts like the dense weight, so the decoded
    weight takes the dtype the dense one would have had."""

    def __init__(self, f: Fixed4, bias: mx.array | None, dtype=None):
        super().__init__()
        self.dn_codec = f
        self.dtype_ref = mx.zeros((), dtype or DTYPES[f._meta[0]])
        if bias is not None:
            self.bias = bias

    @property
    def weight(self) -> mx.array:
        """The decoded weight, at dtype_ref's dtype (decoded on every call: nothing decoded is kept)."""
        f = self.dn_codec
        return _weight(_decode_fixed4(f), f._meta[0], self.dtype_ref.dtype).reshape(f._meta[1])

    def __call__(self, x: mx.array) -> mx.array:
        f = self.dn_codec
        backend = _fused()
        rows = x.size // x.shape[-1]
        if backend is not None and rows <= _MAX_BATCH:
            y = _matvec_fixed4(f, x.reshape(rows, x.shape[-1]), backend)
            y = y.astype(self.dtype_ref.dtype).reshape(*x.shape[:-1], f._meta[1][0])
            return y + self["bias"] if "bias" in self else y
        w = self.weight
        if "bias" in self:
            return mx.addmm(self["bias"], x, w.T)
        return x @ w.T


def attach(model, model_dir: Path, spec) -> None:
    """Replace every coded q/k/v/o/gate/up/down projection of model.model.layers by a CodecLinear over its
    fixed4 layout, built at load (the file stays format v1). A layer's coded tensors are read (the codec file
    opened once: dn.formats.fixed4.read_layers) and converted before the next layer's are read."""
    index = lossless.load_index(Path(model_dir))
    fused, used = _gpu() is not None, set()  # the fused kernel's escape terms: 12 bytes per escape
    layers = model.model.layers
    skip = {i for i, layer in enumerate(layers) if getattr(layer, "elsewhere", False)}  # a pipeline rank's others
    for i, coded in enumerate(fixed4.read_layers(model_dir, len(layers), skip=skip)):
        layer = model.model.layers[i]
        for path in _PROJ:
            name = f"model.layers.{i}.{path}.weight"
            if name not in coded:
                continue
            parent_name, attr = path.split(".")
            parent = getattr(layer, parent_name)
            old = getattr(parent, attr)
            if tuple(old.weight.shape) != tuple(coded[name].shape):
                raise DnError(f"codec: {name} has shape {tuple(coded[name].shape)}, the model expects "
                              f"{tuple(old.weight.shape)}")
            f = Fixed4(coded.pop(name), fused)
            mx.eval(f.parameters())
            # the dense weight it replaces has the compute dtype already (attach may run after set_dtype)
            setattr(parent, attr, CodecLinear(f, old.get("bias"), old.weight.dtype))
            used.add(name)
    missing = sorted(k for k in set(index) - used if int(k.split(".")[2]) not in skip)
    if missing:
        raise DnError(f"codec: coded tensor {missing[0]} is not a projection this model has "
                      f"({len(missing)} unmatched)")
