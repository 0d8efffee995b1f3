"""The runtime layout's numpy reference: bit-exact decode, escapes, and the two-pass matvec."""

import numpy as np
import pytest

from dn import codec
from dn import codec_runtime as cr


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
