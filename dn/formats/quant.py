"""Group-wise quantization, numpy only: the one quantizer of dn.

Affine (mlx-lm's format, what `mx.quantize(w, group_size, bits)` mode "affine" stores and mx.dequantize and
mx.quantized_matmul read): each group of `group_size` weights along a row keeps `bits`-bit codes q in
[0, 2^bits - 1] and one (scale, bias), w ~ scale * q + bias. quantize() fits each group's min/max grid (not
mx.quantize's edge-snapped grid: see its docstring).
Codes are packed into uint32 words as one little-endian bit stream per row: code i of a row occupies
bits [i * bits, (i + 1) * bits) (so 3- and 6-bit codes straddle words, as mlx packs them).

Symmetric (the sparse router and prior sketches): scale = max|w| / (2^(bits-1) - 1) per group, codes
q + 2^(bits-1), i.e. the same layout with bias = -2^(bits-1) * scale.

A quantized model folder stores, per quantized module, `<path>.weight` (packed uint32), `<path>.scales` and
`<path>.biases`, and config.json's "quantization" dict: {"group_size", "bits", "mode"} plus per-path
overrides {path: {"group_size", "bits", "mode"}} (mlx-lm's layout, which mlx_lm.load reads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from dn.core.errors import DnError
from dn.core.tensors import NUMPY, File, convert

BITS = (2, 3, 4, 6, 8)
GROUP_SIZES = (32, 64, 128)
MODE = "affine"
_EPS = np.float32(1e-7)  # mlx's floor on a group's scale


def check(bits, group_size, where: str = "") -> None:
    """where: which module, for the message (" for model.embed_tokens")."""
    if bits not in BITS:
        raise DnError(f"unsupported quantization bits {bits!r}{where} (choose from {', '.join(map(str, BITS))})")
    if group_size not in GROUP_SIZES:
        raise DnError(f"unsupported quantization group size {group_size!r}{where} "
                      f"(choose from {', '.join(map(str, GROUP_SIZES))})")


def check_config(quantization) -> None:
    """A folder's "quantization" dict: affine mode, supported bits and group size, also per path."""
    if not isinstance(quantization, dict):
        raise DnError("quantization config is not an object")
    for where, q in [("", quantization)] + [(f" for {k}", v) for k, v in quantization.items()
                                              if isinstance(v, dict)]:
        if q.get("mode", MODE) != MODE:
            raise DnError(f"unsupported quantization mode {q.get('mode')!r}{where} (dn runs {MODE!r})")
        check(q.get("bits"), q.get("group_size"), where)


def params(bits: int, group_size: int) -> dict:
    """One module's entry of a "quantization" dict, as mlx-lm writes it."""
    return {"group_size": group_size, "bits": bits, "mode": MODE}


def layout(quantization: dict, names) -> dict:
    """Module path -> its quantization parameters, or False when it is stored dense, for every `.weight` in
    `names`; a module is quantized iff `<path>.scales` is stored (mlx-lm's loader rule), with its per-path
    entry else the global bits and group size."""
    names = set(names)
    out = {}
    for name in names:
        path = name.removesuffix(".weight")
        if path == name:
            continue
        own = quantization.get(path)
        if path + ".scales" not in names:
            out[path] = False
        else:
            out[path] = own if isinstance(own, dict) else params(quantization["bits"], quantization["group_size"])
    return out


def packed_shapes(shape, bits: int, group_size: int) -> dict:
    """Dense [rows, cols] -> the stored shapes of weight, scales and biases."""
    rows, cols = shape
    groups = [rows, cols // group_size]
    return {"weight": [rows, cols * bits // 32], "scales": groups, "biases": groups}


def dense_tensors(quantization: dict | None, tensors) -> list[tuple]:
    """(tensor, dense shape, quantization params or None) per stored tensor, scales and biases of quantized
    modules folded into their weight: what the tensors were before quantization."""
    mods = layout(quantization, [t.name for t in tensors]) if quantization else {}
    out = []
    for t in tensors:
        path, _, kind = t.name.rpartition(".")
        q = mods.get(path)
        if q and kind in ("scales", "biases"):
            continue
        if q and kind == "weight":
            out.append((t, [t.shape[0], t.shape[1] * 32 // q["bits"]], q))
        else:
            out.append((t, list(t.shape), None))
    return out


def scale_dtype(stored: str, dtype: str) -> str:
    """The dtype scales and biases are held in at the compute dtype: as stored when that is no wider (16-bit
    scales are exact in float32 arithmetic, at half the bytes; float16 ones lose 3 bits as bfloat16), else the
    compute dtype (Affine.nbytes counts so)."""
    return stored if np.dtype(NUMPY[stored]).itemsize <= np.dtype(NUMPY[dtype]).itemsize else dtype


def side_dtype(scales: np.ndarray, biases: np.ndarray, dtype: str) -> str:
    """The dtype quantize()'s scales and biases are stored in, for a weight stored in dtype: float16 for a
    bfloat16 weight where it holds every value at least as closely as bfloat16 (always within float16's normal
    range, where bfloat16's values are float16's too), else dtype. bfloat16's 8-bit mantissa moves each group's
    grid by up to 2^-9 of its edges: 3x the weight error of float16 on SmolLM2's 4-bit layers, and a GGUF's own
    scales are float16 (docs/results/bf16-mlx.json)."""
    if dtype != "bfloat16":
        return dtype
    v = np.concatenate([np.ravel(scales), np.ravel(biases)]).astype(np.float32)
    with np.errstate(over="ignore"):  # beyond float16's range: inf, farther than bfloat16
        err = {d: np.abs(convert(convert(v, "float32", d), d, "float32") - v) for d in ("float16", "bfloat16")}
    return "float16" if np.all(err["float16"] <= err["bfloat16"]) else dtype


@dataclass
class Affine:
    """A weight in mlx-lm's affine layout, as stored and as held: packed codes and a scale and a bias per group
    (numpy: scales and biases as float32 values)."""
    name: ClassVar[str] = "affine"
    scratch: ClassVar[bool] = False
    weight: np.ndarray  # uint32 [m, k * bits / 32]
    scales: np.ndarray  # float32 [m, k / group_size]
    biases: np.ndarray
    bits: int
    group_size: int

    @classmethod
    def nbytes(cls, shape, dtype_bytes: int, bits: int, group_size: int, scale_bytes: int | None = None) -> int:
        """Bytes held for a weight of dense shape [m, k] at a compute dtype of dtype_bytes: packed codes, and a
        scale and a bias per group at the compute dtype, or as stored (scale_bytes) when smaller."""
        m, k = shape[0], math.prod(shape[1:])
        scale = dtype_bytes if scale_bytes is None else min(dtype_bytes, scale_bytes)
        return m * k * bits // 8 + 2 * m * (k // group_size) * scale

    @classmethod
    def from_stored(cls, f: File, name: str, bits: int, group_size: int) -> Affine:
        """`<path>.weight` (name), `<path>.scales` and `<path>.biases` of a quantized module."""
        path = name.removesuffix(".weight")
        return cls(f.read(name), f.read(f"{path}.scales", "float32"), f.read(f"{path}.biases", "float32"), bits,
                   group_size)

    def dequantize(self) -> np.ndarray:
        return dequantize(self.weight, self.scales, self.biases, self.bits, self.group_size)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float32) @ self.dequantize().T

    def rows(self, idx) -> np.ndarray:
        """Rows idx, dequantizing only them."""
        return dequantize(self.weight[idx], self.scales[idx], self.biases[idx], self.bits, self.group_size)


# ---- packing ---------------------------------------------------------------------------------------

def _chunk(bits: int) -> tuple[int, int]:
    """(codes, bytes) of the smallest whole-byte run of codes: 3-bit codes pack 8 to 3 bytes."""
    nbits = math.lcm(bits, 8)
    return nbits // bits, nbits // 8


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes uint8 [m, k] (each < 2^bits) -> uint32 [m, k * bits / 32], the little-endian bit stream."""
    m, k = codes.shape
    if k * bits % 32:
        raise DnError(f"cannot pack {k} codes of {bits} bits into 32-bit words")
    n, nbytes = _chunk(bits)
    c = codes.reshape(m, k // n, n).astype(np.uint32)
    word = (c << (np.arange(n, dtype=np.uint32) * bits)).sum(-1, dtype=np.uint32)   # <= 24 bits
    out = (word[..., None] >> (np.arange(nbytes, dtype=np.uint32) * 8)).astype(np.uint8)
    return out.reshape(m, -1).view("<u4")


def unpack(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Packed codes [m, *] (uint32 words, or their bytes as uint8) -> uint8 codes [m, k]."""
    m = packed.shape[0]
    n, nbytes = _chunk(bits)
    raw = np.ascontiguousarray(packed).view(np.uint8).reshape(m, -1)[:, :k * bits // 8]
    word = (raw.reshape(m, k // n, nbytes).astype(np.uint32) << (np.arange(nbytes, dtype=np.uint32) * 8)).sum(
        -1, dtype=np.uint32)
    codes = (word[..., None] >> (np.arange(n, dtype=np.uint32) * bits)) & ((1 << bits) - 1)
    return codes.astype(np.uint8).reshape(m, k)


# ---- affine (mlx-lm) ---------------------------------------------------------------------------------

def _groups(w: np.ndarray, group_size: int, dtype) -> np.ndarray:
    if w.ndim != 2 or w.shape[1] % group_size:
        raise DnError(f"cannot quantize a {list(w.shape)} tensor in groups of {group_size}")
    return np.asarray(w, dtype).reshape(w.shape[0], -1, group_size)


def quantize(w: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w [m, k] -> (packed uint32 [m, k*bits/32], scales float32 [m, k/gs], biases float32 [m, k/gs]) on each
    group's min/max grid: bias = min, scale = (max - min) / (2^bits - 1), q = clip(round((w - min) / scale)),
    in float32, rounding half to even (np.rint).

    Both edges of a group lie on its grid (up to float32 rounding), so a weight already on such a grid (e.g.
    dequantized from GGUF Q4_1 at 4 bits, groups of 32) keeps it, and every weight is within scale/2 of its
    dequantized value (plus what storing scale and bias as bf16/f16 moves the grid). A constant group
    (max == min) gets codes 0, bias = min and scale 1e-7 (mlx's floor): no scale is 0. This is not
    mx.quantize's grid (which moves the grid so that the larger-magnitude edge is exactly scale * round(edge /
    scale), re-gridding every Q4_1 block); mlx-lm's loader uses whatever scales and biases are stored."""
    check(bits, group_size)
    g = _groups(w, group_size, np.float32)
    n_bins = np.float32((1 << bits) - 1)
    w_min = g.min(-1)
    scale = np.maximum((g.max(-1) - w_min) / n_bins, _EPS)
    q = np.clip(np.rint((g - w_min[..., None]) / scale[..., None]), 0, n_bins)
    return pack(q.astype(np.uint8).reshape(w.shape), bits), scale.astype(np.float32), w_min.astype(np.float32)


def dequantize(packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group_size: int) -> np.ndarray:
    """-> float32 [m, k], w = scale * q + bias."""
    m, groups = scales.shape
    q = unpack(packed, bits, groups * group_size).astype(np.float32).reshape(m, groups, group_size)
    s, b = np.asarray(scales, np.float32)[..., None], np.asarray(biases, np.float32)[..., None]
    return (q * s + b).reshape(m, -1)


# ---- symmetric (sparse sketches) ---------------------------------------------------------------------

def quantize_symmetric(w: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w [m, k] -> (packed uint32, scales float32, biases float32 = -2^(bits-1) * scale); the arithmetic runs
    in w's float precision (float64 stays float64) so the sparse sketches' bytes never change."""
    half = 1 << (bits - 1)
    g = _groups(w, group_size, np.result_type(w.dtype, np.float32))
    s = np.abs(g).max(-1) / (half - 1) + 1e-12
    q = np.clip(np.round(g / s[..., None]), 1 - half, half - 1).astype(np.int16) + half
    return pack(q.astype(np.uint8).reshape(w.shape), bits), s.astype(np.float32), (-half * s).astype(np.float32)


def dequantize_symmetric(packed: np.ndarray, scales: np.ndarray, bits: int, group_size: int) -> np.ndarray:
    """-> float32 [m, k], w = (q - 2^(bits-1)) * scale (not scale * q + bias: the same bytes as ever)."""
    m, groups = scales.shape
    q = unpack(packed, bits, groups * group_size).astype(np.float32) - (1 << (bits - 1))
    return (q.reshape(m, groups, group_size) * scales[..., None]).reshape(m, -1)
