"""The lossless codec's runtime layout "fixed4": what a coded tensor becomes in memory, separate from the stored
format (dn/formats/lossless.py, version 1, unchanged). The numpy reference every backend's kernels are tested against.

Huffman streams decode serially; this layout decodes every weight independently, so a kernel can decode in
registers inside a matvec (the idea of binade's R4 layout). Per tensor of n 16-bit weights:
  table    uint8 [16]    the 15 most frequent symbols, most frequent first (ties: smaller symbol first);
                         unused entries and entry ESCAPE (15) hold 0
  nibbles  uint8 [ceil(n/2)]  element i's rank in byte i // 2: low nibble for even i, high for odd i;
                         rank ESCAPE marks a symbol outside the table (a padding nibble is 0)
  raw      uint8 [n]     as in dn/formats/lossless.py (bfloat16: sign|mantissa; float16: low byte)
  esc_index int32 [e]    ascending element indices of the escapes
  esc_symbol uint8 [e]   their symbols
bits[i] = lossless.join(table[rank[i]], raw[i]), except at escapes: lossless.join(esc_symbol, raw[i]).

Fused matvec kernels take a simpler route for escapes: the main pass decodes an escape as a weight of 0 and a
correction adds esc_weight * x[col] to y[row] afterwards (row, col = divmod(index, in_features)). So
`matvec` below is that two-pass reference.

Resident bytes (Lossless.nbytes): n/2 + n + 5e + 16, about 12 bits per weight (16 for bf16).
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from dn.core import tensors
from dn.core.errors import DnError
from dn.core.tensors import File
from dn.formats import lossless
from dn.formats import native as nat
from dn.formats.native import ptr

ESCAPE = 15
RANKS = 15  # table entries a nibble can name


@dataclass
class Lossless:
    """A lossless-coded weight (stored: dn/formats/lossless.py) as held: the layout above."""
    name: ClassVar[str] = "lossless"
    scratch: ClassVar[bool] = True  # decoded at use into one buffer, the largest coded weight's, shared by all
    dtype: str
    shape: tuple[int, ...]
    n: int
    table: np.ndarray  # uint8 [16]
    nibbles: np.ndarray  # uint8 [ceil(n/2)]
    raw: np.ndarray  # uint8 [n]
    esc_index: np.ndarray  # int32 [e]
    esc_symbol: np.ndarray  # uint8 [e]

    @classmethod
    def nbytes(cls, shape, dtype_bytes: int, escapes: int = 0) -> int:
        """Bytes a weight of that shape holds in this layout (its decode scratch aside: `scratch`); accounting
        from a spec alone does not know the escapes (5 bytes each; 0.03% of the default model's weights, 0.002
        bits/weight) and omits them."""
        n = math.prod(shape)
        return 16 + (n + 1) // 2 + n + 5 * escapes

    @classmethod
    def from_stored(cls, f: File, name: str, header: dict, threads: int = 1) -> Lossless:
        """A coded tensor of a folder's dn_codec file (header: its dn_codec.json entry), checked and converted."""
        buffers = {k: f.read(k) for k in (f"{name}.{b}" for b in lossless.BUFFERS) if k in f.header}
        return convert(lossless.from_tensors(name, header, buffers), threads)

    def dequantize(self) -> np.ndarray:
        return to_float32(decode(self), self.dtype)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        return matvec(self, x)

    def rows(self, idx) -> np.ndarray:
        return self.dequantize()[idx]

    def bits_per_weight(self) -> float:
        return 8 * sum(a.nbytes for a in buffers(self)) / self.n


def read_layers(model_dir: Path, layers: int, threads: int = 1, skip=()):
    """Per decoder layer, {name: Lossless} of its coded tensors, read from the folder's dn_codec file (opened
    once) and converted before the next layer's are read: the stored Huffman code is never resident. skip: layers
    not read (another pipeline rank's): {} for them."""
    index = lossless.load_index(model_dir)
    with File(Path(model_dir) / lossless.DATA_FILE) as f:
        for i in range(layers):
            prefix = f"model.layers.{i}."
            yield {k: Lossless.from_stored(f, k, index[k], threads) for k in index
                   if k.startswith(prefix) and i not in skip}


def from_bits(bits: np.ndarray, dtype: str) -> Lossless:
    """uint16 bits (any shape) -> the runtime layout."""
    if dtype not in lossless.DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}")
    flat = np.ascontiguousarray(bits).reshape(-1).view(np.uint16)
    return from_symbols(*lossless.split(flat, dtype), dtype, tuple(np.shape(bits)))


def from_symbols(sym: np.ndarray, raw: np.ndarray, dtype: str, shape: tuple[int, ...]) -> Lossless:
    """The layout from a tensor's symbol and raw bytes (dn.formats.lossless.split of its bits), flat uint8 [n] each."""
    if sym.size >= 2**31:
        raise ValueError("tensor too large for int32 escape indices")
    counts = np.bincount(sym, minlength=256)
    order = np.lexsort((np.arange(256), -counts))  # by count descending, then symbol
    top = [int(s) for s in order[:RANKS] if counts[s] > 0]
    table = np.zeros(16, np.uint8)
    table[:len(top)] = top
    rank_of = np.full(256, ESCAPE, np.uint8)
    rank_of[top] = np.arange(len(top), dtype=np.uint8)
    rank = rank_of[sym]
    esc = np.flatnonzero(rank == ESCAPE).astype(np.int32)
    padded = np.zeros(2 * ((sym.size + 1) // 2), np.uint8)
    padded[:sym.size] = rank
    nibbles = (padded[0::2] | (padded[1::2] << 4)).astype(np.uint8)
    return Lossless(dtype, shape, sym.size, table, nibbles, raw, esc, sym[esc].copy())


def from_encoded(enc: lossless.EncodedTensor) -> Lossless:
    """A stored (Huffman) tensor -> the runtime layout; done once at load."""
    return from_bits(lossless.decode(enc), enc.dtype)


def ranks(rt: Lossless) -> np.ndarray:
    """uint8 [n]: each element's nibble."""
    r = np.empty(2 * rt.nibbles.size, np.uint8)
    r[0::2], r[1::2] = rt.nibbles & 0xF, rt.nibbles >> 4
    return r[:rt.n]


def decode(rt: Lossless) -> np.ndarray:
    """-> uint16 bits [shape], bit-exact."""
    sym = rt.table[ranks(rt)]
    sym[rt.esc_index] = rt.esc_symbol
    return lossless.join(sym, rt.raw, rt.dtype).astype(np.uint16).reshape(rt.shape)


def to_float32(bits: np.ndarray, dtype: str) -> np.ndarray:
    """uint16 bits of bfloat16/float16 -> float32 values."""
    return tensors.to_float32(bits.view(tensors.NUMPY[dtype]), dtype)


def matvec(rt: Lossless, x: np.ndarray) -> np.ndarray:
    """y = x @ W.T for W [out, in] in this layout and x [B, in], float32; the fused kernels' two passes."""
    out, k = rt.shape
    r = ranks(rt)
    sym = rt.table[r]
    w = to_float32(lossless.join(sym, rt.raw, rt.dtype).astype(np.uint16), rt.dtype)
    w[r == ESCAPE] = 0.0  # pass 1: escapes count as 0
    y = np.asarray(x, np.float32) @ w.reshape(out, k).T
    ew = to_float32(lossless.join(rt.esc_symbol, rt.raw[rt.esc_index], rt.dtype).astype(np.uint16), rt.dtype)
    rows, cols = np.divmod(rt.esc_index.astype(np.int64), k)
    np.add.at(y.T, rows, (x[:, cols] * ew).T)  # pass 2: the escapes' corrections
    return y


# ---- the C kernels (dn/formats/csrc/codec_runtime.c), on numpy arrays; backends call them on their own memory ---

def native():
    """The C library with its signatures set, or None (DN_NATIVE=0, no compiler): then the plain paths run."""
    lib = nat.library("codec_runtime")
    return lib if lib is None or hasattr(lib, "dn_ready") else declare(lib)


def declare(lib):
    """Set the kernels' ctypes signatures on a loaded library (64-bit sizes must not pass as C ints)."""
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.dn_fixed4_decode.argtypes = [p, p, p, i64, p, p, i64, i32, i32, p, i32]
    lib.dn_fixed4_decode.restype = None
    lib.dn_fixed4_matvec.argtypes = [p, p, p, i64, i64, p, p, i64, i32, p, i32, p, i32]
    lib.dn_fixed4_matvec.restype = i32
    lib.dn_fixed4_matvec_bf16.argtypes = [p, p, p, i64, i64, p, p, i64, p, i32, p, i32]
    lib.dn_fixed4_matvec_bf16.restype = i32
    lib.dn_huffman_symbols.argtypes = [p, i64, p, p, i64, i32, i32, i32, p, i32]
    lib.dn_huffman_symbols.restype = i64
    lib.dn_ready = True
    return lib


def buffers(rt: Lossless) -> tuple:
    """The layout's arrays in the kernels' argument order (table, nibbles, raw, ..., esc_index, esc_symbol)."""
    return rt.table, rt.nibbles, rt.raw, rt.esc_index, rt.esc_symbol


def decode_native(lib, rt, out_f32: bool = False, threads: int = 1, out=None, dtype: str | None = None):
    """The C decode -> uint16 bits [shape] (or float32 values); equal to decode() / to_float32(decode()).
    rt: a Lossless, or any holder of its five buffers (numpy arrays or CPU tensors) with n and shape (a
    backend's module; dtype then given); out: where to write (n elements, contiguous; default a new numpy array)."""
    out = np.empty(rt.n, np.float32 if out_f32 else np.uint16) if out is None else out
    lib.dn_fixed4_decode(*_heads(rt), rt.n, *_escapes(rt), (dtype or rt.dtype) == "bfloat16", out_f32, ptr(out),
                         threads)
    return out.reshape(rt.shape)


def matvec_native_bf16(lib, rt, x_bits, threads: int = 1, dtype: str | None = None, y=None):
    """The C fused GEMV for bfloat16 weights and bfloat16 inputs (x_bits: 16-bit bits [1..4, in], contiguous):
    float32 sums of exact products (vdpbf16ps) [B, out] into y (float32, contiguous; default a new numpy array);
    None where this CPU's build lacks it. rt as in decode_native."""
    out, k = rt.shape
    x_bits = np.ascontiguousarray(x_bits, np.uint16) if isinstance(x_bits, np.ndarray) else x_bits
    y = np.empty((x_bits.shape[0], out), np.float32) if y is None else y
    if (dtype or rt.dtype) != "bfloat16" or x_bits.shape[1] != k:
        raise ValueError(f"matvec_native_bf16 takes bfloat16 weights and x [1..4, {k}], got {list(x_bits.shape)}")
    rc = lib.dn_fixed4_matvec_bf16(*_heads(rt), out, k, *_escapes(rt), ptr(x_bits), x_bits.shape[0], ptr(y), threads)
    if rc == -1:
        raise ValueError(f"matvec_native_bf16 takes x [1..4, {k}], got {list(x_bits.shape)}")
    return None if rc else y


def matvec_native(lib, rt, x, threads: int = 1, dtype: str | None = None, y=None):
    """The C fused decode+GEMV (batch 1..4), float32 x (contiguous) and accumulation, into y as in
    matvec_native_bf16: within tolerance of matvec(). rt as in decode_native."""
    out, k = rt.shape
    x = np.ascontiguousarray(x, np.float32) if isinstance(x, np.ndarray) else x
    y = np.empty((x.shape[0], out), np.float32) if y is None else y
    if x.shape[1] != k or lib.dn_fixed4_matvec(*_heads(rt), out, k, *_escapes(rt), (dtype or rt.dtype) == "bfloat16",
                                               ptr(x), x.shape[0], ptr(y), threads):
        raise ValueError(f"matvec_native takes x [1..4, {k}], got {list(x.shape)}")
    return y


def _heads(rt) -> tuple:
    return ptr(rt.table), ptr(rt.nibbles), ptr(rt.raw)


def _escapes(rt) -> tuple:
    return ptr(rt.esc_index), ptr(rt.esc_symbol), rt.esc_index.shape[0]


def convert(enc: lossless.EncodedTensor, threads: int = 1) -> Lossless:
    """from_encoded, with the Huffman decode in C when the kernels are built (about 20x faster at load)."""
    lib = native()
    if lib is None or not (1 <= enc.lanes <= 4096 and enc.steps >= 1 and 1 <= enc.maxlen <= 24):
        return from_encoded(enc)  # the kernel's limits (its per-tile lane state lives on the stack)
    words, offsets = np.ascontiguousarray(enc.words, np.uint32), np.ascontiguousarray(enc.offsets, np.uint32)
    lut, sym = lossless.build_lut(enc.lengths, enc.maxlen), np.zeros(enc.n, np.uint8)
    if offsets.size < enc.n_tiles * enc.lanes or lib.dn_huffman_symbols(
            ptr(words), words.size, ptr(offsets), ptr(lut), enc.n, enc.lanes, enc.steps, enc.maxlen, ptr(sym), threads):
        raise DnError("codec: a lane stream runs past its tensor's words (corrupt data)")
    return from_symbols(sym, np.ascontiguousarray(enc.raw, np.uint8), enc.dtype, tuple(enc.shape))
