"""The runtime layout's numpy reference (bit-exact decode, escapes, the two-pass matvec), then the C kernels
against it: decode to bits and to float32, the fused GEMV."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dn.core.errors import DnError
from dn.core.tolerances import KERNEL
from dn.formats import fixed4 as cr
from dn.formats import lossless as codec


def _bf16(rng, shape, scale=0.02):
    return (rng.normal(0, scale, shape).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("n", [1, 2, 7, 4096 + 3])
def test_decode_bit_exact(dtype, n):
    rng = np.random.default_rng(n)
    bits = rng.integers(0, 1 << 16, n, dtype=np.uint16)  # every symbol: many escapes
    rt = cr.from_bits(bits, dtype)
    np.testing.assert_array_equal(cr.decode(rt), bits)
    assert rt.esc_index.size == np.isin(codec.split(bits, dtype)[0], rt.table[:cr.RANKS], invert=True).sum()


def test_from_encoded_and_size():
    bits = _bf16(np.random.default_rng(0), (256, 512))
    rt = cr.from_encoded(codec.encode(bits, "bfloat16"))
    np.testing.assert_array_equal(cr.decode(rt), bits)
    assert rt.esc_index.size < 0.01 * bits.size  # trained-like weights: escapes are rare
    assert 12.0 <= rt.bits_per_weight() < 12.5


def test_table_order():
    sym = np.array([5] * 9 + [3] * 9 + [7] * 2 + [9], np.uint16)
    rt = cr.from_bits(sym << 7, "bfloat16")
    assert list(rt.table[:4]) == [3, 5, 7, 9] and rt.esc_index.size == 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_matvec_reference(dtype):
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.02, (33, 64)).astype(np.float32)
    w[rng.random(w.shape) < 0.05] *= 1e4  # force escapes
    bits = (w.view(np.uint32) >> 16).astype(np.uint16) if dtype == "bfloat16" else w.astype(np.float16).view(np.uint16)
    rt = cr.from_bits(bits, dtype)
    assert rt.esc_index.size > 0
    x = rng.normal(size=(3, 64)).astype(np.float32)
    want = x @ cr.to_float32(bits, dtype).T
    np.testing.assert_allclose(cr.matvec(rt, x), want, rtol=1e-5, atol=1e-5)


# ---- the C kernels (dn/formats/csrc/codec_runtime.c) against the reference above
# ----------------------------------------

SPECIAL = [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0x0001, 0x807F, 0x7C00, 0xFC00, 0x7E00, 0x7C01, 0x03FF]


@pytest.fixture(scope="module")
def lib():
    from helpers import native_or_skip

    return native_or_skip(cr.native)


def upcast(bits, dtype):
    """The float32 values the kernels give: the reference upcast, float16 NaNs made quiet as x86's vcvtph2ps
    (and so torch's upcast) makes them; numpy keeps signalling ones."""
    u = cr.to_float32(bits, dtype).view(np.uint32)
    return np.where(np.isnan(u.view(np.float32)), u | 0x400000, u) if dtype == "float16" else u


def weights_like(rng, n, dtype, escapes=100):
    w = rng.normal(0, 0.02, n).astype(np.float32)
    bits = (w.view(np.uint32) >> 16).astype(np.uint16) if dtype == "bfloat16" else w.astype(np.float16).view(np.uint16)
    bits[rng.integers(0, n, escapes)] = rng.integers(0, 1 << 16, escapes)  # rare symbols: escapes
    bits[rng.integers(0, n, len(SPECIAL))] = SPECIAL
    return bits


@settings(max_examples=60, deadline=None)
@given(bits=st.lists(st.one_of(st.integers(0, 0xFFFF), st.sampled_from(SPECIAL)), min_size=1, max_size=3000),
       dtype=st.sampled_from(codec.DTYPES), threads=st.sampled_from([1, 2]))
def test_native_decode_fuzzed_bits(lib, bits, dtype, threads):
    b = np.array(bits, np.uint16)
    rt = cr.from_bits(b, dtype)
    np.testing.assert_array_equal(cr.decode_native(lib, rt, threads=threads), b)
    np.testing.assert_array_equal(cr.decode_native(lib, rt, True, threads).view(np.uint32), upcast(b, dtype))


@pytest.mark.parametrize("dtype", codec.DTYPES)
@pytest.mark.parametrize("n", [63, 64, 65, (1 << 22) + 37])  # the vector steps' edges; two OpenMP threads
def test_native_decode_trained_like(lib, dtype, n):
    b = weights_like(np.random.default_rng(n), n, dtype)
    rt = cr.from_bits(b, dtype)
    assert rt.esc_index.size > 0
    for threads in (1, 2):
        np.testing.assert_array_equal(cr.decode_native(lib, rt, threads=threads), b)
        np.testing.assert_array_equal(cr.decode_native(lib, rt, True, threads).view(np.uint32), upcast(b, dtype))


@pytest.mark.parametrize("dtype", codec.DTYPES)
@pytest.mark.parametrize("shape", [(33, 64), (7, 31), (130, 576), (3, 1)])  # odd in: rows start mid-byte
@pytest.mark.parametrize("batch", [1, 2, 3, 4])
def test_native_matvec_matches_reference(lib, dtype, shape, batch):
    rng = np.random.default_rng(shape[0] * batch)
    w = rng.normal(0, 0.02, shape).astype(np.float32)
    w[rng.random(shape) < 0.03] *= rng.choice([1e4, 1e-5])  # rare exponents: escapes, finite sums
    bits = (w.view(np.uint32) >> 16).astype(np.uint16) if dtype == "bfloat16" else w.astype(np.float16).view(np.uint16)
    rt = cr.from_bits(bits, dtype)
    x = rng.normal(size=(batch, shape[1])).astype(np.float32)
    want, tol = cr.matvec(rt, x), KERNEL["float32"]
    bound = tol.atol + tol.rtol * (np.abs(x) @ np.abs(cr.to_float32(bits, dtype).reshape(shape)).T)  # sum order
    for threads in (1, 2):
        assert (np.abs(cr.matvec_native(lib, rt, x, threads) - want) <= bound).all()


@pytest.mark.parametrize("shape", [(33, 64), (7, 31), (130, 576), (64, 200)])  # in % 64 != 0: scalar tails
@pytest.mark.parametrize("batch", [1, 2, 3, 4])
def test_native_matvec_bf16_inputs(lib, shape, batch):
    """bf16 weights times bf16 inputs (vdpbf16ps): products exact, float32 sums, so within the float32 bound."""
    rng = np.random.default_rng(shape[1] * batch)
    w = rng.normal(0, 0.02, shape).astype(np.float32)
    w[rng.random(shape) < 0.03] *= rng.choice([1e4, 1e-5])
    rt = cr.from_bits((w.view(np.uint32) >> 16).astype(np.uint16), "bfloat16")
    xb = (rng.normal(size=(batch, shape[1])).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    x, tol = cr.to_float32(xb, "bfloat16"), KERNEL["float32"]
    got = cr.matvec_native_bf16(lib, rt, xb, threads=2)
    if got is None:
        pytest.skip("this CPU's build has no AVX512-BF16 path")
    bound = tol.atol + tol.rtol * (np.abs(x) @ np.abs(cr.to_float32(cr.decode(rt), "bfloat16")).T)
    assert (np.abs(got - cr.matvec(rt, x)) <= bound).all()


def test_native_matvec_rejects_batch_and_width(lib):
    rt = cr.from_bits(np.zeros((4, 8), np.uint16), "bfloat16")
    for x in (np.zeros((5, 8)), np.zeros((1, 7))):
        with pytest.raises(ValueError, match="matvec_native takes"):
            cr.matvec_native(lib, rt, x)


@pytest.mark.parametrize("dtype", codec.DTYPES)
@pytest.mark.parametrize("geometry", [(128, 512), (32, 8), (64, 3)])
def test_convert_equals_from_encoded(lib, dtype, geometry):
    """The load-time conversion with its Huffman decode in C gives the reference's layout, field for field."""
    for n in (1, 777, 70001):
        enc = codec.encode(weights_like(np.random.default_rng(n), n, dtype), dtype, *geometry)
        got, want = cr.convert(enc, threads=2), cr.from_encoded(enc)
        assert (got.dtype, got.shape, got.n) == (want.dtype, want.shape, want.n)
        for a, b in zip(cr.buffers(got), cr.buffers(want)):
            np.testing.assert_array_equal(a, b)


def test_native_matvec_two_threads(lib):
    """Large enough for the kernel to use two OpenMP threads (2M weights each): same result as one thread's."""
    rng = np.random.default_rng(5)
    bits = weights_like(rng, 1100 * 4096, "bfloat16", escapes=500)
    bits[np.isnan(cr.to_float32(bits, "bfloat16")) | np.isinf(cr.to_float32(bits, "bfloat16"))] = 0
    rt = cr.from_bits(bits.reshape(1100, 4096), "bfloat16")
    x = rng.normal(size=(3, 4096)).astype(np.float32)
    np.testing.assert_array_equal(cr.matvec_native(lib, rt, x, 2), cr.matvec_native(lib, rt, x, 1))


def test_portable_path_without_avx512(tmp_path):
    """The same source built for baseline x86-64 (no AVX-512: the scalar loops only) decodes and multiplies like
    the reference; dn.formats.native builds with -march=native, so this is the path other CPUs take."""
    import ctypes
    import platform
    import subprocess

    from dn.formats import native

    cc = native._compiler()
    if cc is None or platform.machine() != "x86_64":
        pytest.skip("needs a C compiler on x86-64")
    so = tmp_path / "portable.so"
    flags = [f for f in native.FLAGS if f != "-march=native"] + ["-march=x86-64"]
    subprocess.run([cc, *flags, str(native.SRC / "codec_runtime.c"), "-o", str(so), "-lm"], check=True)
    lib = cr.declare(ctypes.CDLL(str(so)))
    rng = np.random.default_rng(9)
    for dtype in codec.DTYPES:
        b = weights_like(rng, 5001, dtype)
        rt = cr.from_bits(b, dtype)
        np.testing.assert_array_equal(cr.decode_native(lib, rt), b)
        np.testing.assert_array_equal(cr.decode_native(lib, rt, True).view(np.uint32), upcast(b, dtype))
        w = rng.normal(0, 0.02, (40, 96)).astype(np.float32)
        w[rng.random(w.shape) < 0.03] *= 1e4
        bits = (w.view(np.uint32) >> 16).astype(np.uint16) if dtype == "bfloat16" else w.astype(np.float16).view(
            np.uint16)
        rt, x = cr.from_bits(bits, dtype), rng.normal(size=(2, 96)).astype(np.float32)
        bound = KERNEL["float32"].atol + KERNEL["float32"].rtol * (np.abs(x) @ np.abs(cr.to_float32(bits, dtype)).T)
        assert (np.abs(cr.matvec_native(lib, rt, x) - cr.matvec(rt, x)) <= bound).all()
        if dtype == "bfloat16":  # no AVX512-BF16 in this build: the caller is told to take the float32 path
            assert cr.matvec_native_bf16(lib, rt, np.zeros((1, 96), np.uint16)) is None


def test_convert_rejects_streams_past_the_words(lib):
    """Offsets that point past the bitstream (a checksum does not stop a crafted file) raise, never read out of
    bounds."""
    enc = codec.encode(weights_like(np.random.default_rng(3), 5000, "bfloat16"), "bfloat16", lanes=32, steps=16)
    enc.offsets = enc.offsets.copy()
    enc.offsets[-1] = 32 * enc.words.size
    with pytest.raises(DnError, match="runs past"):
        cr.convert(enc)
    enc.offsets = enc.offsets[:-1]
    with pytest.raises(DnError, match="runs past"):
        cr.convert(enc)
