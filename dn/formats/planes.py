"""Split planes: a bf16 weight matrix's bits cut into a 6-bit sketch a router reads and a 6-bit rest that completes
them, so a sparse MLP routes on the first planes and reads the rest only for the neurons it keeps. The numpy
reference every kernel is tested against.

Per row-major matrix W [m, k] of bfloat16 bits s|e|m (sign, 8-bit exponent, 7-bit mantissa):
  table  15 exponents of W: every one from the most frequent up (the large weights, which the router must see; the
         largest first if they are more), then the most frequent of the rest; rank r[i] its index, ESCAPE (15) for
         any other exponent (rare, and below the most frequent magnitude by construction)
  cent   float32 [32]: the mean |w| of W's weights sharing (r, m6), m6 the mantissa's top bit (0 for ESCAPE)
  sketch the 6-bit code q = r | m6 << 4 | sign << 5 per weight: the router's w^ = +-cent[2 r + m6], the weight to
         within its exponent and top mantissa bit (escapes count 0)
  rest   the 6 low mantissa bits (0 at escapes), and the escapes' exact bits (row-wise: esc_ptr [m + 1], esc_col
         int32, esc_bits uint16)
Both 6-bit planes are uint8 [m, 3k/4]: each 8 weights in 6 bytes, weight w of the 8 at bits 6w, little-endian (what
AVX-512 VBMI's multishift unpacks in one step).
sketch + rest = 12 bits per weight plus escapes: with table and the escapes, bit-exact bf16 (16).

Against a separate int4 router over gate and up (4.5 bits per weight, 18.75% of a dense MLP's bytes, read on top of
the weights), the sketch is part of the weights: a kept neuron reads its rest, a skipped one nothing more, and the
router estimates better (recall against the oracle 0.935 vs 0.919 on the default model at keep 50%:
docs/results/sparse-quality-planes-torch.json, sparse-quality-torch.json).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from dn.core import activations
from dn.core.errors import DnError
from dn.core.tensors import File, bf16_to_f32, f32_to_bf16
from dn.formats import native as nat
from dn.formats.native import ptr

ESCAPE = 15
META = 48  # float32 per matrix in a sparse file's router.b / prior.b: table (16, as floats), then cent (32)


@dataclass
class Rest:
    """What completes a sketch into exact bf16 bits."""
    planes: np.ndarray    # uint8 [m, 3k/4]
    esc_ptr: np.ndarray   # int64 [m + 1]
    esc_col: np.ndarray   # int32 [e]
    esc_bits: np.ndarray  # uint16 [e]


def check_width(k: int) -> None:
    if k % 8:
        raise DnError(f"split planes need a row length divisible by 8, got {k}")


def _pack(f: np.ndarray) -> np.ndarray:
    """uint8 [m, k] 6-bit fields -> uint8 [m, 3k/4]: each 8 fields in 6 bytes, field w at bits 6w (little-endian)."""
    m, k = f.shape
    g = f.reshape(m, k // 8, 8).astype(np.uint64)
    v = np.bitwise_or.reduce(g << (6 * np.arange(8, dtype=np.uint64)), axis=2)
    return np.ascontiguousarray(v[..., None].view(np.uint8)[..., :6].reshape(m, 3 * k // 4))


def _unpack(p: np.ndarray, k: int) -> np.ndarray:
    """uint8 [m, 3k/4] -> the 6-bit fields, uint8 [m, k]."""
    m = p.shape[0]
    b = np.zeros((m, k // 8, 8), np.uint8)
    b[..., :6] = p.reshape(m, k // 8, 6)
    v = b.view(np.uint64)
    return ((v >> (6 * np.arange(8, dtype=np.uint64))) & 63).astype(np.uint8).reshape(m, k)


def bf16_bits(w: np.ndarray) -> np.ndarray:
    """float32 values that are bfloat16 values -> their uint16 bits (DnError when some are not)."""
    u = np.ascontiguousarray(w, np.float32).view(np.uint32)
    if np.any(u & 0xFFFF):
        raise DnError("split planes hold bfloat16 weights; these are not bfloat16 values")
    return (u >> 16).astype(np.uint16)


def split(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray, Rest]:
    """uint16 bf16 bits [m, k] -> (sketch uint8 [m, 3k/4], meta float32 [META], rest)."""
    m, k = bits.shape
    check_width(k)
    b = bits.astype(np.uint32)
    e, mant, sign = (b >> 7) & 0xFF, b & 0x7F, b >> 15
    counts = np.bincount(e.ravel(), minlength=256)
    big = (np.arange(256) >= np.argmax(counts)) & (counts > 0)  # every exponent from the most frequent up: the large,
    order = np.lexsort((-np.arange(256), -counts, ~big))  # which the router must see; then the frequent ones
    top = [int(s) for s in order[:ESCAPE] if counts[s] > 0]
    rank_of = np.full(256, ESCAPE, np.uint8)
    rank_of[top] = np.arange(len(top), dtype=np.uint8)
    r = rank_of[e]
    m6 = np.where(r == ESCAPE, 0, mant >> 6).astype(np.uint8)
    key = (2 * r.astype(np.int64) + m6).ravel()
    mag = np.abs(bf16_to_f32(bits)).astype(np.float64).ravel()
    tot, cnt = np.bincount(key, mag, 32), np.bincount(key, minlength=32)
    cent = np.where(cnt > 0, tot / np.maximum(cnt, 1), 0.0).astype(np.float32)
    cent[2 * ESCAPE:] = 0.0                      # escapes route as 0
    cent = bf16_to_f32(f32_to_bf16(cent))         # bf16 values: the kernels' router dots are exact products
    table = np.zeros(16, np.float32)
    table[:len(top)] = top
    sketch = _pack((r | (m6 << 4) | (sign << 5)).astype(np.uint8))
    rest_planes = _pack(np.where(r == ESCAPE, 0, mant & 63).astype(np.uint8))  # an escape's exact bits are listed
    rows, cols = np.nonzero(r == ESCAPE)
    ptr = np.zeros(m + 1, np.int64)
    np.add.at(ptr, rows + 1, 1)
    rest = Rest(rest_planes, np.cumsum(ptr), cols.astype(np.int32), bits[rows, cols].astype(np.uint16))
    return sketch, np.concatenate([table, cent.astype(np.float32)]), rest


def rest_of(bits: np.ndarray, sketch: np.ndarray, meta: np.ndarray) -> Rest:
    """The rest of bits [m, k] under a stored sketch and meta (a sparse file's); DnError unless the sketch is the
    split of these very bits (a spec fitted on other weights would decode wrong weights)."""
    s2, m2, rest = split(bits)
    if not (np.array_equal(s2, sketch) and np.array_equal(m2[:16], meta[:16])):
        raise DnError("the sparse spec's split planes do not match the model's weights (fitted on other weights?)")
    return rest


def luts(meta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The kernels' two 64-entry tables over a weight's sketch code q = r | a << 4: uint16 bf16 bits of the router's
    w^ (+-cent[2 r + m6]), and the exact bits' high part (sign, exponent, m6); both 0 for r = ESCAPE."""
    q = np.arange(64)
    r, m6, sign = q & 15, (q >> 4) & 1, q >> 5
    w = np.where(sign, -1, 1) * meta[16:][2 * r + m6]
    hi = (sign << 15) | (meta[:16].astype(np.int64)[r] << 7) | (m6 << 6)
    live = r != ESCAPE
    return (np.where(live, bf16_bits(w.astype(np.float32)), 0).astype(np.uint16),
            np.where(live, hi, 0).astype(np.uint16))


def codes(sketch: np.ndarray, k: int) -> np.ndarray:
    """Each weight's sketch code r | m6 << 4 | sign << 5, int64 [m, k]."""
    return _unpack(sketch, k).astype(np.int64)


def sketch_values(sketch: np.ndarray, meta: np.ndarray, k: int) -> np.ndarray:
    """The router's w^ [m, k] float32: +-cent[2 r + m6], 0 at escapes."""
    return bf16_to_f32(luts(meta)[0][codes(sketch, k)])


def join(sketch: np.ndarray, meta: np.ndarray, rest: Rest, k: int) -> np.ndarray:
    """sketch + rest -> uint16 bf16 bits [m, k], bit-exact."""
    bits = luts(meta)[1][codes(sketch, k)] | _unpack(rest.planes, k)
    rows = np.repeat(np.arange(len(rest.esc_ptr) - 1), np.diff(rest.esc_ptr))
    bits[rows, rest.esc_col] = rest.esc_bits
    return bits.astype(np.uint16)


def split_float(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, Rest]:
    """split() of float weights rounded to bfloat16 (as torch's .to(bfloat16) rounds: the runtime's bf16 weights)."""
    return split(f32_to_bf16(w))


def stack(parts: list[tuple[np.ndarray, np.ndarray, Rest]]) -> tuple[np.ndarray, np.ndarray, list[Rest]]:
    """Splits of several matrices -> their sketches stacked by rows [sum m, ...], metas [P, META], rests."""
    return np.concatenate([p[0] for p in parts]), np.stack([p[1] for p in parts]), [p[2] for p in parts]


def stacked_values(sketch: np.ndarray, metas: np.ndarray, k: int) -> np.ndarray:
    """Stacked sketches (equal row blocks, one meta each) -> w^ [sum m, k]."""
    blocks = np.split(sketch, len(metas))
    return np.concatenate([sketch_values(s, meta, k) for s, meta in zip(blocks, metas)])


# ---- the C kernels (dn/formats/csrc/planes.c), on numpy arrays or CPU tensors: backends pass their own memory ---

# a matrix as the kernels take it; lut_w, lut_hi: luts() as uint8 [128], the 64 low bytes then the 64 high bytes
FIELDS = ("sketch", "rest", "esc_ptr", "esc_col", "esc_bits", "lut_w", "lut_hi")


def arrays(sketch: np.ndarray, meta: np.ndarray, rest: Rest | None = None) -> dict[str, np.ndarray]:
    """One matrix's arrays by FIELDS name (numpy; a backend moves them into its own arrays). Without its rest: the
    sketch alone (routing, the sketch prior), the rest fields empty (the kernels' sketch passes never read them)."""
    lut_w, lut_hi = (np.concatenate([t.view(np.uint8)[0::2], t.view(np.uint8)[1::2]]) for t in luts(meta))
    if rest is None:
        rest = Rest(np.zeros((0, 0), np.uint8), np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.uint16))
    return {"sketch": np.ascontiguousarray(sketch), "rest": rest.planes, "esc_ptr": rest.esc_ptr,
            "esc_col": rest.esc_col, "esc_bits": rest.esc_bits, "lut_w": lut_w, "lut_hi": lut_hi}


def native():
    """dn/formats/csrc/planes.c with its signatures set, or None (DN_NATIVE=0, no compiler)."""
    lib = nat.library("planes")
    if lib is not None and not hasattr(lib, "dn_ready"):
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.dn_planes_step.argtypes = [p, i64, i64, i64, p, p, p, p, p, i32, i32, p, p, i32, i32]
        lib.dn_planes_step.restype = i32
        lib.dn_planes_join.argtypes = [p, i64, i64, p, i32, i32]
        lib.dn_planes_join.restype = None
        lib.dn_planes_estimate.argtypes = [p, i64, i64, i64, p, p, i32, p, i32]
        lib.dn_planes_estimate.restype = i32
        lib.dn_planes_sketch.argtypes = [p, i64, i64, i64, p, p, i32]
        lib.dn_planes_sketch.restype = i32
        lib.dn_ready = True
    return lib


class Mat(ctypes.Structure):
    """The kernels' matrix struct (mat_t in dn/formats/csrc/planes.c): FIELDS' addresses."""
    _fields_ = [(f, ctypes.c_void_p) for f in FIELDS]


def mat(fields: dict) -> Mat:
    """The kernels' matrix struct over arrays or CPU tensors by FIELDS name; it keeps them alive."""
    m = Mat(*[ptr(fields[f]) for f in FIELDS])
    m.held = fields  # the pointers are into these
    return m


def _check(rc: int, what: str, t: int) -> None:
    """A kernel's return code: -1 tokens out of range, -2 out of memory."""
    if rc == -2:
        raise MemoryError(f"the split-planes {what}: out of memory")
    if rc:
        raise ValueError(f"the split-planes {what} takes 1-4 tokens, got {t}")


def step_native(lib, x_bits, mats: tuple, thresh, c, y, mask, act: int, sketch: bool, route: bool,
                threads: int = 1) -> None:
    """The fused step in C: x_bits bf16 bits [T <= 4, d]; mats (gate, up, down) from mat(); y float32 [T, d] holds
    y0 and is accumulated into; mask uint8 [T, n] written (route) or read; act: dn.core.activations.kind. Any
    contiguous CPU memory."""
    t, d = x_bits.shape
    _check(lib.dn_planes_step(ptr(x_bits), t, thresh.shape[0], d, *[ctypes.byref(m) for m in mats], ptr(thresh),
                              ptr(c), int(sketch), int(route), ptr(mask), ptr(y), act, threads), "step", t)


def join_native(lib, m: Mat, rows: int, k: int, out, threads: int = 1, exact: bool = True) -> None:
    """A matrix's exact bf16 bits (exact False: its sketch's w^) into out (uint16 [rows, k], contiguous CPU memory)."""
    lib.dn_planes_join(ctypes.byref(m), rows, k, ptr(out), int(exact), threads)


def estimate_native(lib, x_bits, gate: Mat, up: Mat, act: int, est, threads: int = 1) -> None:
    """The router alone in C: est float32 [T <= 4, n] = act(g^) u^ from the gate and up structs (mat())."""
    t, d = x_bits.shape
    _check(lib.dn_planes_estimate(ptr(x_bits), t, est.shape[1], d, ctypes.byref(gate), ctypes.byref(up), act,
                                  ptr(est), threads), "router", t)


def sketch_native(lib, h, down: Mat, y, threads: int = 1) -> None:
    """The sketch prior alone in C: y float32 [T <= 4, d] += h [T, n] @ down~ (h = 0 skips a neuron)."""
    t, n = h.shape
    _check(lib.dn_planes_sketch(ptr(h), t, n, y.shape[1], ctypes.byref(down), ptr(y), threads), "sketch", t)


def step(x: np.ndarray, gate: tuple, up: tuple, down: tuple, thresh: np.ndarray, c: np.ndarray, y0: np.ndarray,
         act_name: str, sketch: bool, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The numpy reference of the fused step: x [T, d] float32 (bf16 values); gate, up, down = (sketch, meta, rest) of
    [n, d] ([n, d] for down: its columns) -> (y [T, d] float64, mask bool [T, n]). mask given: replayed."""
    d = x.shape[1]
    x64 = x.astype(np.float64)
    w_hat = [sketch_values(s, m, d).astype(np.float64) for s, m, _ in (gate, up, down)]
    est = activations.apply(act_name, x64 @ w_hat[0].T) * (x64 @ w_hat[1].T)
    mask = np.abs(est) > thresh if mask is None else mask
    g, u, dd = (bf16_to_f32(join(s, m, r, d)).astype(np.float64) for s, m, r in (gate, up, down))
    h = np.where(mask, activations.apply(act_name, x64 @ g.T) * (x64 @ u.T) - c, 0.0)
    y = y0.astype(np.float64) + h @ dd
    if sketch:
        y += np.where(mask, 0.0, est) @ w_hat[2]
    return y, mask


@dataclass
class Planes:
    """A bf16 matrix [m, k] held as split planes: its sketch, meta and rest (numpy)."""
    name: ClassVar[str] = "planes"
    scratch: ClassVar[bool] = True  # the plain paths (prefill) decode each into one bf16 matrix in turn
    sketch: np.ndarray
    meta: np.ndarray
    rest: Rest
    shape: tuple[int, int]

    @classmethod
    def nbytes(cls, shape, dtype_bytes: int = 2, part: str = "all") -> int:
        """Bytes held for an [m, k] matrix: its sketch (6 bits a weight, its two 128-byte tables, a row offset),
        its rest (6 bits a weight and each row's escape offset; the rare escapes not counted), or both."""
        m, k = shape
        sketch, rest = m * 3 * k // 4 + 256 + 8, m * 3 * k // 4 + 8 * m
        return {"sketch": sketch, "rest": rest, "all": sketch + rest}[part]

    @classmethod
    def from_stored(cls, f: File, name: str) -> Planes:
        return cls(*split(f.read(name, "bfloat16")), tuple(f.shape(name)))

    def dequantize(self) -> np.ndarray:
        return bf16_to_f32(join(self.sketch, self.meta, self.rest, self.shape[1]))

    def matmul(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float32) @ self.dequantize().T

    def rows(self, idx) -> np.ndarray:
        return self.dequantize()[idx]
