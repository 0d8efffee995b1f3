"""GGUF block types (llama.cpp's ggml quants), numpy only: their layouts, their decode, and the exact move of the
affine ones into dn's affine store (dn.formats.quant, mlx-lm's layout).

A quantized GGUF tensor of dense shape [rows, cols] is stored as uint8 [rows, cols / block_weights * block_bytes]:
each row a run of blocks. Every block type is a grid per sub-block: w = scale * (code - zero) (symmetric: Q4_0,
Q5_0, Q8_0, Q3_K, Q6_K) or w = scale * code + min (Q4_1, Q5_1; the k-quants Q2_K, Q4_K, Q5_K with min = -dmin * m).
decode() computes it in float32 exactly as gguf.quants.dequantize does (the reference, bit for bit).

Exact in dn's affine store (scale * q + bias, groups of 32): Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (one 32-weight block a
group) and Q4_K, Q5_K (32-weight sub-blocks, scale = d * sc, bias = -dmin * m). 5-bit codes ride in 6 bits
(quant.BITS has no 5). A symmetric type's bias is -zero * scale (zero a power of two, so exact); its values then
equal the reference's, though a 0 may come out +0 where the reference gives -0. Q2_K, Q3_K and Q6_K have 16-weight
sub-blocks, which quant.GROUP_SIZES (32, 64, 128) cannot hold: they stay GGUFBlocks.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from dn.core.errors import DnError
from dn.formats import native as nat
from dn.formats import quant
from dn.formats.native import ptr

TYPES = {  # name: (ggml type id, weights per block, bytes per block)
    "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20), "Q5_0": (6, 32, 22), "Q5_1": (7, 32, 24), "Q8_0": (8, 32, 34),
    "Q2_K": (10, 256, 84), "Q3_K": (11, 256, 110), "Q4_K": (12, 256, 144), "Q5_K": (13, 256, 176),
    "Q6_K": (14, 256, 210)}
AFFINE = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 6, "Q5_1": 6, "Q8_0": 8, "Q4_K": 4, "Q5_K": 6}  # bits of the codes in dn
GROUP = 32  # the affine group of every exact type
_IDS = {v[0]: k for k, v in TYPES.items()}


def type_name(t) -> str:
    """A type as a name ("Q4_K"), a ggml type id (12) or gguf's GGMLQuantizationType -> its name."""
    name = _IDS.get(t, getattr(t, "name", t)) if isinstance(t, int) else t
    if name not in TYPES:
        raise DnError(f"unsupported GGUF block type {getattr(t, 'name', t)} (dn reads {', '.join(TYPES)})")
    return name


def stored_shape(shape, t) -> list[int]:
    """Dense [rows, cols] -> the blocks' uint8 [rows, row_bytes]; cols must be whole blocks."""
    name = type_name(t)
    _, bw, bb = TYPES[name]
    rows, cols = shape
    if cols % bw:
        raise DnError(f"a row of {cols} weights is not whole {name} blocks of {bw}")
    return [rows, cols // bw * bb]


def dense_shape(stored, t) -> list[int]:
    """The blocks' uint8 [rows, row_bytes] -> the dense [rows, cols]."""
    _, bw, bb = TYPES[type_name(t)]
    return [stored[0], stored[1] // bb * bw]


def _f16(b: np.ndarray) -> np.ndarray:
    """uint8 [n, 2] -> float32 [n, 1]."""
    return np.ascontiguousarray(b).view("<f2").astype(np.float32)


def _split(x: np.ndarray, width: int) -> np.ndarray:
    """uint8 [..., m] -> its 8 / width fields of `width` bits, low bits first: [..., 8 / width, m]."""
    shifts = np.arange(0, 8, width, dtype=np.uint8)[:, None]
    return (x[..., None, :] >> shifts) & np.uint8((1 << width) - 1)


def _scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> 8 6-bit scales and 8 6-bit mins per block."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([d & 63, (md & 15) | ((d >> 2) & 48)], -1)
    mn = np.concatenate([m & 63, (md >> 4) | ((m >> 2) & 48)], -1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _grid(name: str, b: np.ndarray):
    """Blocks uint8 [n, block_bytes] -> (codes uint8 [n, sub-blocks, sub-block], zero, scale float32 [n, sub-blocks],
    min float32 [n, sub-blocks] or None): w = scale * (codes - zero), or scale * codes + min."""
    n = len(b)
    if name == "Q8_0":
        return (b[:, 2:] ^ np.uint8(0x80)).reshape(n, 1, 32), 128, _f16(b[:, :2]), None  # int8 x -> x + 128
    if name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        o = 4 if name.endswith("1") else 2
        codes = _split(b[:, o + 4 * (name[1] == "5"):], 4).reshape(n, 1, 32)
        if name[1] == "5":  # the fifth bit of weight i is bit i of a little-endian uint32
            codes |= np.unpackbits(b[:, o:o + 4], axis=-1, bitorder="little").reshape(n, 1, 32) << np.uint8(4)
        if name.endswith("1"):
            return codes, 0, _f16(b[:, :2]), _f16(b[:, 2:4])
        return codes, 8 if name == "Q4_0" else 16, _f16(b[:, :2]), None
    if name == "Q2_K":  # scales[16], qs[64], d, dmin
        sc, d, dmin = b[:, :16], _f16(b[:, 80:82]), _f16(b[:, 82:84])
        codes = _split(b[:, 16:80].reshape(n, 2, 32), 2).reshape(n, 16, 16)
        return codes, 0, d * (sc & 15).astype(np.float32), -(dmin * (sc >> 4).astype(np.float32))
    if name == "Q3_K":  # hmask[32], qs[64], scales[12], d; w = d * (s - 32) * (low | high << 2 - 4)
        low = _split(b[:, 32:96].reshape(n, 2, 32), 2).reshape(n, 16, 16)
        high = _split(b[:, :32], 1).reshape(n, 16, 16)
        s = _split(b[:, 96:104], 4).reshape(n, 16) | (_split(b[:, 104:108], 2).reshape(n, 16) << np.uint8(4))
        return low | (high << np.uint8(2)), 4, _f16(b[:, 108:110]) * (s.astype(np.float32) - 32), None
    if name in ("Q4_K", "Q5_K"):  # d, dmin, scales[12], (qh[32],) qs[128]
        sc, mn = _scale_min_k4(b[:, 4:16])
        codes = _split(b[:, -128:].reshape(n, 4, 32), 4).reshape(n, 8, 32)
        if name == "Q5_K":
            codes |= _split(b[:, 16:48], 1) << np.uint8(4)
        return codes, 0, _f16(b[:, :2]) * sc, -(_f16(b[:, 2:4]) * mn)
    # Q6_K: ql[128], qh[64], scales[16] int8, d
    codes = _split(b[:, :128].reshape(n, 2, 64), 4).reshape(n, 8, 32)
    codes |= _split(b[:, 128:192].reshape(n, 2, 32), 2).reshape(n, 8, 32) << np.uint8(4)
    return codes.reshape(n, 16, 16), 32, _f16(b[:, 208:210]) * b[:, 192:208].view(np.int8).astype(np.float32), None


def _blocks(name: str, raw: np.ndarray) -> np.ndarray:
    bb = TYPES[name][2]
    if raw.dtype != np.uint8 or raw.shape[-1] % bb:
        raise DnError(f"GGUF {name} rows must be uint8 runs of {bb}-byte blocks, got {raw.dtype} {list(raw.shape)}")
    return np.ascontiguousarray(raw).reshape(-1, bb)


def decode(t, raw: np.ndarray) -> np.ndarray:
    """Raw blocks uint8 [..., row_bytes] -> float32 [..., row_weights], as gguf.quants.dequantize computes them."""
    name = type_name(t)
    codes, zero, scale, mn = _grid(name, _blocks(name, raw))
    q = codes.astype(np.float32)
    w = scale[..., None] * (q - zero) if mn is None else scale[..., None] * q + mn[..., None]
    return w.reshape(*raw.shape[:-1], -1)


def _narrow(x: np.ndarray) -> np.ndarray:
    """float16 where it holds every value exactly (the GGUF's own d and m do), else float32 (products d * sc)."""
    with np.errstate(over="ignore"):
        h = x.astype(np.float16)
    return h if np.array_equal(h, x) else x


def to_affine(t, raw: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """An exact type's raw blocks uint8 [rows, row_bytes] of dense shape [rows, cols] -> (packed uint32, scales,
    biases, bits, group_size) in dn's affine layout: quant.dequantize gives decode()'s values. Scales and biases
    are float16 where that holds them exactly, else float32."""
    name = type_name(t)
    if name not in AFFINE:
        raise DnError(f"GGUF type {name} has 16-weight sub-blocks: no exact affine form in dn's store "
                      f"(group sizes {', '.join(map(str, quant.GROUP_SIZES))}); hold it as GGUFBlocks")
    rows, cols = shape
    codes, zero, scale, mn = _grid(name, _blocks(name, raw))
    bias = np.float32(-zero) * scale if mn is None else mn  # zero a power of two: exact
    packed = quant.pack(codes.reshape(rows, cols), AFFINE[name])
    return packed, _narrow(scale.reshape(rows, -1)), _narrow(bias.reshape(rows, -1)), AFFINE[name], GROUP


@dataclass
class GGUFBlocks:
    """A weight held as its GGUF blocks (uint8 [rows, row_bytes]), decoded at use: the format of the types that
    have no exact affine form (Q2_K, Q3_K, Q6_K), and of any type held as the file has it."""
    name: ClassVar[str] = "gguf"
    scratch: ClassVar[bool] = False  # decoded a block (or a few rows) at a time, never a whole matrix
    raw: np.ndarray
    type: str

    @classmethod
    def nbytes(cls, shape, dtype_bytes: int, type: str) -> int:
        """The block bytes, exactly as in the file."""
        _, bw, bb = TYPES[type_name(type)]
        m, k = shape[0], math.prod(shape[1:])
        if k % bw:
            raise DnError(f"a row of {k} weights is not whole {type_name(type)} blocks of {bw}")
        return m * (k // bw) * bb

    @classmethod
    def from_stored(cls, f, name: str, type: str) -> GGUFBlocks:
        return cls(f.read(name), type_name(type))

    def dequantize(self) -> np.ndarray:
        return decode(self.type, self.raw)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float32) @ self.dequantize().T

    def rows(self, idx) -> np.ndarray:
        """Rows idx, decoding only them."""
        return decode(self.type, self.raw[idx])


def quantize_q8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x float32 [..., k] -> its 8-bit copy as the integer path makes it (llama.cpp's Q8_0): per 32 values dx =
    amax / 127 and q = rint(x * (127 / amax)) (0 where amax is 0): (q int8 [..., k], dx float32 [..., k / 32])."""
    x = np.asarray(x, np.float32)
    b = x.reshape(*x.shape[:-1], -1, 32)
    amax = np.abs(b).max(-1)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0))
    return np.rint(b * inv[..., None]).astype(np.int8).reshape(x.shape), amax / np.float32(127)


def matmul_q8(t, raw: np.ndarray, x: np.ndarray) -> np.ndarray:
    """What the integer path computes: x's 8-bit copy (quantize_q8) @ decode(W).T, exactly (float64) -> float32."""
    q, dx = quantize_q8(x)
    xq = q.reshape(*q.shape[:-1], -1, 32) * dx[..., None].astype(np.float64)
    return (xq.reshape(q.shape) @ decode(t, raw).astype(np.float64).T).astype(np.float32)


# ---- the C kernel (dn/formats/csrc/gguf.c); backends pass their own memory ----------------------------------

def native():
    """dn/formats/csrc/gguf.c with its signatures set, or None (DN_NATIVE=0, no compiler): the plain paths run."""
    lib = nat.library("gguf")
    if lib is not None and not hasattr(lib, "dn_ready"):
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.dn_gguf_matmul.argtypes, lib.dn_gguf_matmul.restype = [i32, p, i64, i64, p, i64, p, i32], i32
        lib.dn_gguf_rows.argtypes, lib.dn_gguf_rows.restype = [i32, p, i64, p, i64, p, i32], i32
        lib.dn_gguf_matmul_q8.argtypes, lib.dn_gguf_matmul_q8.restype = [i32, p, i64, i64, p, i64, p, p, i32, i32], i32
        lib.dn_gguf_quantize_q8.argtypes, lib.dn_gguf_quantize_q8.restype = [p, i32, i64, p, p], i32
        lib.dn_gguf_q8_types.restype = ctypes.c_uint
        lib.q8 = frozenset(n for n, (t, _, _) in TYPES.items() if lib.dn_gguf_q8_types() >> t & 1)
        lib.dn_ready = True
    return lib


def check(rc: int) -> None:
    """A kernel's return code: -1 an unknown type, -2 out of memory, -3 a type or CPU the integer path lacks."""
    if rc == -3:
        raise ValueError("the GGUF kernel: no integer path for this type on this CPU (see native().q8)")
    if rc:
        raise MemoryError("the GGUF kernel: out of memory") if rc == -2 else ValueError("the GGUF kernel: bad type")


def matmul_native(lib, t: str, raw, x, y, threads: int = 1) -> None:
    """y float32 [T, m] = x float32 [T, k] @ W.T, W held as raw blocks uint8 [m, row_bytes] (contiguous CPU memory,
    numpy or torch)."""
    check(lib.dn_gguf_matmul(TYPES[t][0], ptr(raw), raw.shape[0], x.shape[1], ptr(x), x.shape[0], ptr(y), threads))


BF16_X, BF16_Y = 1, 2  # matmul_q8_native's bf16 flags: x, and y with its bias, as bfloat16


def matmul_q8_native(lib, t: str, raw, x, y, threads: int = 1, bf16: int = 0, bias=None) -> None:
    """y [T, m] = x [T, k] @ W.T (+ bias [m]) through x's 8-bit copy (quantize_q8) and integer dots; float32, or
    bfloat16 where bf16 says (BF16_X | BF16_Y; torch's bf16, or its bits as uint16). For the types in lib.q8 only
    (none without AVX512_VNNI)."""
    check(lib.dn_gguf_matmul_q8(TYPES[t][0], ptr(raw), raw.shape[0], x.shape[1], ptr(x), x.shape[0], ptr(y),
                                None if bias is None else ptr(bias), bf16, threads))


def rows_native(lib, t: str, raw, idx, out, threads: int = 1) -> None:
    """out float32 [n, k] = rows idx (int64 [n]; None: all of raw's rows) of raw blocks, as decode() gives them."""
    check(lib.dn_gguf_rows(TYPES[t][0], ptr(raw), out.shape[1], None if idx is None else ptr(idx), out.shape[0],
                         ptr(out), threads))
