"""GGUF block types: dn's numpy decode against the gguf package's (the reference), bit for bit; the exact types'
move into dn's affine store; the block format object. Random blocks, then real tensors of the shipped GGUFs."""

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize as reference

from dn import formats
from dn.core import tensors
from dn.core.errors import DnError
from dn.formats import gguf_blocks as gb
from dn.formats import quant
from dn.model import gguf as dn_gguf
from dn.model import sources

FP16_AT = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82),
           "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}  # byte offsets of d (and dmin / m)
SYMMETRIC = {"Q4_0", "Q5_0", "Q8_0"}  # values equal; a 0 may be +0 where the reference has -0


def random_raw(name, rows, blocks_per_row, rng):
    """Random blocks whose fp16 fields are finite (any finite fp16: subnormal, negative, up to 65504)."""
    bb = gb.TYPES[name][2]
    raw = rng.integers(0, 256, (rows * blocks_per_row, bb), dtype=np.uint8)
    for at in FP16_AT[name]:
        bits = rng.integers(0, 1 << 16, len(raw), dtype=np.uint16)
        bits[(bits & 0x7C00) == 0x7C00] &= 0x83FF  # inf/nan exponent -> a finite one
        raw[:, at:at + 2] = bits.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, blocks_per_row * bb)


def check(name, raw, shape, rng):
    """Every equality the format promises, on raw blocks uint8 [rows, row_bytes] of dense shape `shape`."""
    ref = reference(raw, gguf.GGMLQuantizationType[name]).reshape(shape)
    w = gb.decode(name, raw)
    assert np.array_equal(w.view(np.uint32), ref.view(np.uint32)), name  # bit for bit, signs of 0 too
    held = gb.GGUFBlocks(raw, name)
    assert held.nbytes(shape, 4, type=name) == raw.nbytes
    idx = rng.permutation(shape[0])[:5]
    assert np.array_equal(held.rows(idx).view(np.uint32), w[idx].view(np.uint32)), name
    x = rng.standard_normal((2, shape[1]), np.float32)
    assert np.array_equal(held.matmul(x), x @ w.T), name
    if name not in gb.AFFINE:
        with pytest.raises(DnError, match=name):
            gb.to_affine(name, raw, shape)
        return
    packed, scales, biases, bits, gs = gb.to_affine(name, raw, shape)
    assert packed.dtype == np.uint32 and scales.dtype in (np.float16, np.float32) and gs == 32, name
    quant.check(bits, gs)
    a = quant.dequantize(packed, scales, biases, bits, gs)
    if name in SYMMETRIC:
        assert np.array_equal(a, w), name
    else:
        assert np.array_equal(a.view(np.uint32), w.view(np.uint32)), name
    return scales.dtype, biases.dtype


@pytest.mark.parametrize("name", list(gb.TYPES))
def test_random_blocks(name):
    rng = np.random.default_rng(sorted(gb.TYPES).index(name))
    per_row = 2 if name.endswith("_K") else 8
    raw = random_raw(name, 64, per_row, rng)
    check(name, raw, (64, per_row * gb.TYPES[name][1]), rng)


def test_scale_dtypes():
    """float16 where the GGUF's own fp16 values are the scales and biases; float32 where a product d * sc is not
    always a float16 (k-quants) or -zero * d overflows float16 (large d)."""
    rng = np.random.default_rng(7)
    small = {}
    for name in gb.AFFINE:
        raw = random_raw(name, 8, 8, rng)
        for at in FP16_AT[name]:  # |d| < 1: no overflow of -128 * d
            raw.reshape(-1, gb.TYPES[name][2])[:, at + 1] &= 0x3B
        small[name] = check(name, raw, (8, 8 * gb.TYPES[name][1]), rng)
    for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        assert small[name] == (np.float16, np.float16), name
    for name in ("Q4_K", "Q5_K"):
        assert small[name] == (np.float32, np.float32), name
    raw = random_raw("Q8_0", 4, 2, rng)
    raw.reshape(-1, 34)[:, :2] = np.array([60000], np.float16).view(np.uint8)
    assert check("Q8_0", raw, (4, 64), rng) == (np.float16, np.float32)


def test_types_and_registry(tmp_path):
    assert formats.get("gguf") is gb.GGUFBlocks
    assert gb.type_name(12) == gb.type_name(gguf.GGMLQuantizationType.Q4_K) == "Q4_K"
    for bad in ("IQ2_XS", gguf.GGMLQuantizationType.F16, 1):
        with pytest.raises(DnError, match="unsupported GGUF block type"):
            gb.type_name(bad)
    rng = np.random.default_rng(3)
    raw = random_raw("Q6_K", 4, 1, rng)
    tensors.save({"w.weight": raw}, tmp_path / "x.safetensors")
    with tensors.File(tmp_path / "x.safetensors") as f:
        held = formats.get("gguf").from_stored(f, "w.weight", type="Q6_K")
    assert np.array_equal(held.dequantize(), gb.decode("Q6_K", raw))


def real_tensors(path, per_type=2, rows=128):
    """(type name, raw rows, dense shape) for the first `per_type` 2-D tensors of each type in a GGUF."""
    seen = {}
    for t in dn_gguf.open_gguf(path).tensors:
        name = t.tensor_type.name
        if name in gb.TYPES and len(t.shape) == 2 and seen.get(name, 0) < per_type:
            seen[name] = seen.get(name, 0) + 1
            raw = np.asarray(t.data[:rows])
            yield name, raw, (len(raw), int(t.shape[0]))


def test_default_model_gguf():
    found = set()
    for name, raw, shape in real_tensors(sources.default_gguf()):
        check(name, raw, shape, np.random.default_rng(0))
        found.add(name)
    assert found >= {"Q4_1", "Q8_0"}


def test_gemma3_gguf():
    try:
        path = sources.short_name_gguf("gemma3-270m")
    except DnError as e:
        pytest.skip(f"Gemma 3 270M GGUF not installed ({e})")
    found = set()
    for name, raw, shape in real_tensors(path):
        check(name, raw, shape, np.random.default_rng(0))
        found.add(name)
    assert found >= {"Q4_K", "Q5_0", "Q6_K", "Q8_0"}
