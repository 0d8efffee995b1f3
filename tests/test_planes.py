"""Split planes (dn/formats/planes.py): the layout against its definition, and its C kernel
(dn/formats/csrc/planes.c) against the
numpy reference; the sparse MLP on them per backend is in tests/test_sparse.py (router "planes")."""

import numpy as np
import pytest

from dn.core import activations, tolerances
from dn.core.errors import DnError
from dn.core.tensors import bf16_to_f32, f32_to_bf16
from dn.formats import planes, sparse


def _round(v):
    """float32 -> the nearest bfloat16 values, as float32."""
    return bf16_to_f32(f32_to_bf16(np.asarray(v, np.float32)))


def _bf16(rng, shape, scale=0.05):
    return _round(rng.standard_normal(shape).astype(np.float32) * scale)


def _odd_weights(rng, m, k, big=1e5):
    """bf16 weights with what the layout must survive: zeros, -0, subnormals, rare large and tiny exponents."""
    w = _bf16(rng, (m, k))
    flat = w.reshape(-1)
    spots = rng.choice(flat.size, 12, replace=False)
    flat[spots] = np.array([0.0, -0.0, 1e-39, -3e-39, 3e-30, -2e-25, big / 500, -big, 7e-20, 1e-33, 3.0, -9.0],
                           np.float32)
    return _round(w)


def test_split_join_is_bit_exact_and_escapes_are_rare_and_small():
    rng = np.random.default_rng(0)
    bits = planes.bf16_bits(_odd_weights(rng, 64, 136))
    sk, meta, rest = planes.split(bits)
    assert sk.shape == rest.planes.shape == (64, 136 * 3 // 4)
    assert np.array_equal(planes.join(sk, meta, rest, 136), bits)
    assert 0 < rest.esc_bits.size < 0.01 * bits.size
    w, v = bf16_to_f32(bits), planes.sketch_values(sk, meta, 136)
    # the huge weights sit in the table (the router sees them); what escapes is small
    assert np.abs(bf16_to_f32(rest.esc_bits)).max() < 0.01 * np.median(np.abs(w))
    big = np.unravel_index(np.argmax(np.abs(w)), w.shape)
    assert w[big] < 0 and -w[big] / 2 < -v[big] <= -w[big] * 2  # its class mean: same exponent and top bit


def test_sketch_values_are_sign_times_the_mean_of_their_class():
    """w^ = sign(w) * mean |w| over the weights sharing w's exponent and top mantissa bit (bf16-rounded), 0 at
    escapes: checked from the bits, independently of the packing."""
    rng = np.random.default_rng(1)
    w = _bf16(rng, (32, 64))
    bits = planes.bf16_bits(w)
    sk, meta, _ = planes.split(bits)
    got = planes.sketch_values(sk, meta, 64)
    key = (bits.astype(np.int64) >> 6) & 0x1FF          # exponent and m6
    for k in np.unique(key):
        sel = key == k
        want = _round(np.float32(np.abs(w[sel]).astype(np.float64).mean()))
        assert np.all(got[sel] == np.where(w[sel] < 0, -want, want))


def test_rest_of_refuses_other_weights_and_widths():
    rng = np.random.default_rng(2)
    bits = planes.bf16_bits(_bf16(rng, (8, 64)))
    sk, meta, _ = planes.split(bits)
    other = planes.bf16_bits(_bf16(rng, (8, 64)))
    with pytest.raises(DnError, match="do not match"):
        planes.rest_of(other, sk, meta)
    with pytest.raises(DnError, match="divisible by 8"):
        planes.split(planes.bf16_bits(_bf16(rng, (8, 12))))
    with pytest.raises(DnError, match="not bfloat16"):
        planes.bf16_bits(np.full((2, 8), 0.1, np.float32))


def _layer_mats(rng, n, d):
    return [planes.split(planes.bf16_bits(_odd_weights(rng, n, d, big=10.0))) for _ in range(3)]


@pytest.fixture(scope="module")
def lib():
    from helpers import native_or_skip

    return native_or_skip(planes.native)


@pytest.mark.parametrize("d", [128, 136, 200])   # whole 64-blocks, a tail, a tail only past two blocks
@pytest.mark.parametrize("tokens", [1, 3, 4])
@pytest.mark.parametrize("act,sketch", [("silu", True), ("silu", False), ("gelu_tanh", True)])
def test_kernel_matches_reference(lib, d, tokens, act, sketch):
    """The fused C step routes as the reference does (router dots are exact bf16 products: only float32 sums
    differ) and, on the same selection, computes y within the kernel tolerance; replaying a selection works."""
    rng = np.random.default_rng(d + tokens)
    n = 320
    mats = _layer_mats(rng, n, d)
    x = _bf16(rng, (tokens, d), 1.0)
    thresh = np.full(n, 0.02, np.float32) * rng.uniform(0.5, 1.5, n).astype(np.float32)
    c = (rng.standard_normal(n) * 0.01).astype(np.float32)
    y0 = (rng.standard_normal(d) * 0.1).astype(np.float32)
    held = [planes.arrays(*m) for m in mats]
    structs = tuple(planes.mat(a) for a in held)
    y, mask = np.tile(y0, (tokens, 1)), np.zeros((tokens, n), np.uint8)
    planes.step_native(lib, planes.bf16_bits(x), structs, thresh, c, y, mask, activations.kind(act), sketch, True)
    _, ref_mask = planes.step(x, *mats, thresh, c, y0, act, sketch)
    assert (mask.astype(bool) == ref_mask).mean() >= 0.998 and 0.05 < ref_mask.mean() < 0.95
    want, _ = planes.step(x, *mats, thresh, c, y0, act, sketch, mask.astype(bool))
    tol = tolerances.KERNEL["float32"]
    np.testing.assert_allclose(y, want, rtol=tol.rtol, atol=tol.atol * np.abs(want).max())
    y2 = np.tile(y0, (tokens, 1))
    flipped = ~ref_mask
    planes.step_native(lib, planes.bf16_bits(x), structs, thresh, c, y2, flipped.astype(np.uint8),
                       activations.kind(act), sketch, False)
    want2, _ = planes.step(x, *mats, thresh, c, y0, act, sketch, flipped)
    np.testing.assert_allclose(y2, want2, rtol=tol.rtol, atol=tol.atol * np.abs(want2).max())


def test_kernel_threads_and_join(lib):
    rng = np.random.default_rng(5)
    n, d = 2048, 136
    mats = _layer_mats(rng, n, d)
    structs = tuple(planes.mat(planes.arrays(*m)) for m in mats)
    x = planes.bf16_bits(_bf16(rng, (1, d), 1.0))
    thresh, c, y0 = np.full(n, 0.02, np.float32), np.zeros(n, np.float32), np.zeros(d, np.float32)
    outs = []
    for threads in (1, 2):
        y, mask = np.tile(y0, (1, 1)), np.zeros((1, n), np.uint8)
        planes.step_native(lib, x, structs, thresh, c, y, mask, 0, True, True, threads)
        outs.append((y, mask))
    assert np.array_equal(outs[0][1], outs[1][1])
    np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    for m, s in zip(mats, structs):
        out = np.empty((n, d), np.uint16)
        planes.join_native(lib, s, n, d, out, 2)
        assert np.array_equal(out, planes.join(*m, d))
    with pytest.raises(ValueError, match="1-4 tokens"):
        planes.step_native(lib, np.zeros((5, d), np.uint16), structs, thresh, c, np.zeros((5, d), np.float32),
                           np.zeros((5, n), np.uint8), 0, True, True)


@pytest.mark.parametrize("prior", ["sketch", "none"])
def test_split_layer_holds_what_the_accounting_says(backend_name, prior):
    """At bf16 a router-"planes" layer holds its MLP as split planes, no bundle: its arrays add up to
    dn.model.store.sparse_side + split_mlp_bytes' rest (+ the escapes, which accounting leaves out)."""
    from dn.model import store
    from dn.runtime import backend as backends
    from dn.runtime import sparse_mlp

    rng = np.random.default_rng(3)
    n, d = 256, 128
    g, u, dn = (_bf16(rng, s) for s in ((n, d), (n, d), (d, n)))
    x = _bf16(rng, (64, d), 1.0)
    layer = sparse.fit_layer(x, g, u, dn, n // 2, 16, prior, "planes", "threshold")
    mlp = backends.get(backend_name).make_sparse_mlp(sparse.bundle(g, u, dn), layer, "bfloat16")
    assert mlp.bundled is None and mlp.split
    if hasattr(mlp, "buffers"):
        held = sum(t.nbytes for t in mlp.buffers())
    else:
        from mlx.utils import tree_flatten

        held = sum(v.nbytes for _, v in tree_flatten(mlp.parameters()))
    section = {"hidden": d, "intermediate": n, "router": "planes", "prior": prior, "select": "threshold"}
    escapes = sum(int(m["esc_col"].shape[0]) for m in mlp.planes) * 6
    assert held == store.sparse_side(section, 2)["held"] + store.split_mlp_bytes(section)["rest"] + escapes
    # and it computes what the bundle would: the decoded weights are the bf16 ones
    b = sparse_mlp.step(x[:3], mlp, "masked")
    want = sparse.sparse_mlp_step(x[:3], sparse.bundle(g, u, dn), layer, sparse_mlp.route(x[:3], mlp))
    np.testing.assert_allclose(b, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())


def test_portable_build_matches_reference(tmp_path):
    """planes.c without AVX-512 (no -march, no OpenMP): its portable loops against the reference too."""
    import ctypes
    import subprocess

    from dn.formats import native

    cc = native._compiler()
    if cc is None:
        pytest.skip("no C compiler")
    so = tmp_path / "planes_portable.so"
    subprocess.run([cc, "-O2", "-fPIC", "-shared", "-std=c11", str(native.SRC / "planes.c"), "-o", str(so), "-lm"],
                   check=True, capture_output=True)
    lib = ctypes.CDLL(str(so))
    assert lib.dn_planes_isa() == 0
    fast = planes.native()
    if fast is None:
        pytest.skip("no native build to take the signatures from")
    for name in ("dn_planes_step", "dn_planes_join"):  # the same signatures as the native build's
        getattr(lib, name).argtypes = getattr(fast, name).argtypes
        getattr(lib, name).restype = getattr(fast, name).restype
    rng = np.random.default_rng(9)
    n, d, tokens = 320, 136, 3
    mats = _layer_mats(rng, n, d)
    structs = tuple(planes.mat(planes.arrays(*m)) for m in mats)
    x = _bf16(rng, (tokens, d), 1.0)
    thresh, c, y0 = np.full(n, 0.02, np.float32), np.zeros(n, np.float32), np.zeros(d, np.float32)
    y, mask = np.zeros((tokens, d), np.float32), np.zeros((tokens, n), np.uint8)
    planes.step_native(lib, planes.bf16_bits(x), structs, thresh, c, y, mask, 0, True, True)
    want, _ = planes.step(x, *mats, thresh, c, y0, "silu", True, mask.astype(bool))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert (mask.astype(bool) == planes.step(x, *mats, thresh, c, y0, "silu", True)[1]).mean() >= 0.998
    out = np.empty((n, d), np.uint16)
    planes.join_native(lib, structs[0], n, d, out)
    assert np.array_equal(out, planes.join(*mats[0], d))


@pytest.mark.parametrize("backend,device,dense,want", [
    ("torch", "cpu", True, "planes"), ("torch", "cpu", False, "int4"), ("torch", "cuda:NVIDIA H200", True, "int4"),
    ("mlx", "metal:Apple M4", True, "int4"), ("mlx", "cpu", True, "int4")])
def test_conversions_fit_planes_where_its_kernels_run(backend, device, dense, want):
    assert sparse.default_router(backend, device, dense) == want
