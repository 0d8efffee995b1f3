"""The fixed4 Triton kernels (dn_torch/_triton_codec.py) against the numpy reference dn.formats.fixed4: decode
bit-exact, fused decode+GEMV within dn.core.tolerances.KERNEL, over fuzzed shapes (odd sizes, escapes, specials,
misaligned buffers), batch 1..16, both dtypes. On CPU the checks run in Triton's interpreter (a subprocess with
TRITON_INTERPRET=1, where Triton is installed); on CUDA the same checks run for real (marked gpu)."""

import importlib.util
import os
import types

import numpy as np
import pytest
from helpers import assert_runs_in_triton_interpreter

from dn.core.tolerances import KERNEL
from dn.formats import fixed4 as codec_runtime
from dn.formats import lossless as codec

torch = pytest.importorskip("torch")

SPECIAL = [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0x0001, 0x807F, 0x7C00, 0xFC00, 0x7E00, 0x03FF]
TDT = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def on_device(rt: codec_runtime.Lossless, device: str, misalign: bool = False):
    """The layout's arrays as torch tensors; misalign: raw starts at an odd byte (the kernels' unpaired path)."""
    t = types.SimpleNamespace(dtype=rt.dtype, shape=rt.shape)
    for name in ("table", "nibbles", "raw", "esc_index", "esc_symbol"):
        setattr(t, name, torch.from_numpy(np.ascontiguousarray(getattr(rt, name))).to(device))
    if misalign:
        buf = torch.empty(t.raw.numel() + 1, dtype=torch.uint8, device=device)
        buf[1:] = t.raw
        t.raw = buf[1:]
    return t


def weight_bits(rng, n: int, dtype: str, escapes: float) -> np.ndarray:
    """16-bit patterns of N(0, 0.02) weights; a fraction `escapes` scaled far out (finite), which lands their
    exponents outside the 15-entry table."""
    w = rng.normal(0, 0.02, n).astype(np.float32)
    far = rng.random(n) < escapes
    wide = [2.0**-40, 2.0**-30, 2.0**12, 2.0**20] if dtype == "bfloat16" else [2.0**-12, 2.0**-8, 2.0**6]
    w[far] *= rng.choice(wide, far.sum())
    if dtype == "float16":
        return np.clip(w, -6e4, 6e4).astype(np.float16).view(np.uint16)
    return (w.view(np.uint32) >> 16).astype(np.uint16)


def decode_cases(rng):
    """(bits, dtype, misalign_raw, misalign_out): random patterns with specials (most are escapes), weight-like
    ones, tiny, odd and no-escape tensors."""
    for dtype in codec.DTYPES:
        for n in (1, 2, 3, 5, 16, 1000, 4097):
            bits = rng.integers(0, 0x10000, n).astype(np.uint16)
            bits[rng.integers(0, n, max(1, n // 20))] = rng.choice(SPECIAL, max(1, n // 20))
            yield bits, dtype, False, False
        yield weight_bits(rng, 30001, dtype, 0.002), dtype, False, False
        yield weight_bits(rng, 5000, dtype, 0.01), dtype, True, False
        yield weight_bits(rng, 5000, dtype, 0.01), dtype, False, True
        yield rng.choice(SPECIAL[:10], 777).astype(np.uint16), dtype, False, False  # <= 15 symbols: no escape


def check_decode(device: str, seed: int = 0) -> int:
    """Every case into int16 bits, then into the coded dtype or float32 (the runtime's scratch dtypes)."""
    from dn_torch import _triton_codec as tk

    cases = 0
    for i, (bits, dtype, mis_raw, mis_out) in enumerate(decode_cases(np.random.default_rng(seed))):
        rt = codec_runtime.from_bits(bits, dtype)
        t = on_device(rt, device, mis_raw)
        want = codec_runtime.decode(rt).reshape(-1)
        for out_dtype in (torch.int16, [TDT[dtype], torch.float32][i % 2]):
            out = torch.full((rt.n + 2,), -1, dtype=out_dtype, device=device)
            got = tk.fixed4_decode(t, out[1:] if mis_out else out)
            if out_dtype == torch.float32:  # NaN payloads survive the upcast, so compare bits
                expect = codec_runtime.to_float32(want, dtype).view(np.uint32)
                same = np.array_equal(got.cpu().numpy().view(np.uint32), expect)
            else:
                same = np.array_equal(got.cpu().view(torch.int16).numpy().view(np.uint16), want)
            assert same, (dtype, rt.n, mis_raw, mis_out, out_dtype)
            assert out[-1].item() == -1, "wrote past n"
            cases += 1
    return cases


MATVEC_SHAPES = [(1, 2), (3, 5), (7, 130), (33, 200), (64, 256), (17, 1025), (9, 4096), (130, 96)]


def matvec_cases(rng):
    """(shape, dtype, batch, escape fraction, config or None)."""
    for i, shape in enumerate(MATVEC_SHAPES):
        for dtype in codec.DTYPES:
            yield shape, dtype, int(rng.integers(1, 17)), [0.0, 0.003, 0.05][i % 3], None
    for batch in (1, 2, 4, 16):
        yield (40, 512), "bfloat16", batch, 0.01, None
    yield (48, 1000), "bfloat16", 3, 0.01, {"SPLIT_K": 3, "BLOCK_N": 16}
    yield (31, 999), "float16", 5, 0.01, {"SPLIT_K": 2, "BLOCK_K": 128}
    yield (50, 300), "float16", 1, 0.01, {"BLOCK_N": 1, "BLOCK_K": 64}
    # tensor-core tiles (tf32): bf16 and fp16, batch padded to 16, odd `in` falling back to FMAs
    yield (40, 512), "bfloat16", 4, 0.02, {"DOT": True, "BLOCK_N": 16, "BLOCK_K": 64}
    yield (33, 200), "float16", 16, 0.02, {"DOT": True, "BLOCK_N": 32, "BLOCK_K": 128}
    yield (20, 96), "bfloat16", 1, 0.02, {"DOT": True, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 2}
    yield (17, 1025), "bfloat16", 2, 0.02, {"DOT": True, "BLOCK_N": 16, "BLOCK_K": 64}


def check_matvec(device: str, seed: int = 1) -> int:
    from dn_torch import _triton_codec as tk

    rng = np.random.default_rng(seed)
    cases = 0
    for shape, dtype, batch, esc, cfg in matvec_cases(rng):
        bits = weight_bits(rng, shape[0] * shape[1], dtype, esc).reshape(shape)
        rt = codec_runtime.from_bits(bits, dtype)
        x = torch.randn(batch, shape[1], generator=torch.Generator().manual_seed(cases)).to(TDT[dtype])
        want = codec_runtime.matvec(rt, x.float().numpy())
        got = tk.fixed4_matvec(on_device(rt, device), x.to(device), cfg)
        assert got.dtype == x.dtype and got.shape == (batch, shape[0])
        tol = KERNEL[dtype]
        scale = max(float(np.abs(want).max()), 1e-30)
        np.testing.assert_allclose(got.float().cpu().numpy(), want, rtol=tol.rtol, atol=tol.atol * scale,
                                   err_msg=f"{shape} {dtype} B={batch} esc={esc} {cfg}")
        cases += 1
    return cases


def check_runtime_hook(device: str) -> int:
    """dn_torch.codec's CUDA hook (what CodecLinear.weight calls on CUDA) into every scratch dtype the runtime
    uses: bits, the coded dtype, float32 (exact upcast) and the other 16-bit float (converted as Tensor.to)."""
    from dn_torch import codec as tc

    rng = np.random.default_rng(5)
    cases = 0
    for dtype in codec.DTYPES:
        rt = codec_runtime.from_bits(weight_bits(rng, 3 * 4099, dtype, 0.01).reshape(3, 4099), dtype)
        ref = torch.from_numpy(codec_runtime.decode(rt).reshape(-1).view(np.int16))
        other = torch.float16 if dtype == "bfloat16" else torch.bfloat16
        for sdt in (torch.int16, TDT[dtype], torch.float32, other):
            lin = tc.CodecLinear(rt, [torch.empty(rt.n + 5, dtype=sdt, device=device)], 3, None)
            got = tc._decode_fixed4_cuda(lin, lin._scratch[0][3:3 + rt.n])
            want = ref if sdt == torch.int16 else ref.view(TDT[dtype]).to(sdt)
            bits = torch.int32 if sdt == torch.float32 else torch.int16
            assert torch.equal(got.cpu().view(bits), want.view(bits)), (dtype, sdt)
            if device == "cuda":  # the property the model reads goes through the same hook
                assert torch.equal(lin.weight.reshape(-1).cpu().view(bits), want.view(bits)), (dtype, sdt)
            cases += 1
    return cases


def check_all(device: str) -> str:
    return (f"decode {check_decode(device)} cases, matvec {check_matvec(device)} cases, "
            f"runtime hook {check_runtime_hook(device)} cases")


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_triton
def test_fixed4_kernels_in_the_interpreter():
    """The same kernels on CPU through TRITON_INTERPRET=1 (a fresh process: the flag is read at import)."""
    assert_runs_in_triton_interpreter(__file__)


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("seed", range(3))
def test_fixed4_decode_cuda(seed):
    check_decode("cuda", seed)


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("seed", range(3))
def test_fixed4_matvec_cuda(seed):
    check_matvec("cuda", seed)


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_fixed4_runtime_hook_cuda():
    check_runtime_hook("cuda")


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", codec.DTYPES)
def test_fixed4_large_layers_cuda(dtype):
    """Llama-8B projection shapes: decode bit-exact, matvec at batch 1/4/16 within the kernel tolerance."""
    from dn_torch import _triton_codec as tk

    rng = np.random.default_rng(0)
    for shape in ((4096, 4096), (14336, 4096), (4096, 14336)):
        bits = weight_bits(rng, shape[0] * shape[1], dtype, 0.0005).reshape(shape)
        rt = codec_runtime.from_bits(bits, dtype)
        t = on_device(rt, "cuda")
        assert np.array_equal(tk.fixed4_decode(t).cpu().numpy().view(np.uint16), bits.reshape(-1)), shape
        for batch in (1, 4, 16):
            x = torch.randn(batch, shape[1]).to(TDT[dtype])
            want = codec_runtime.matvec(rt, x.float().numpy())
            got = tk.fixed4_matvec(t, x.cuda()).float().cpu().numpy()
            tol = KERNEL[dtype]
            np.testing.assert_allclose(got, want, rtol=tol.rtol, atol=tol.atol * np.abs(want).max())


def test_bad_batch_or_tiles_are_refused():
    """The fused kernel's batch bound and the tensor-core tile bounds are checked before any launch."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton not installed")
    from dn_torch import _triton_codec as tk

    rt = codec_runtime.from_bits(weight_bits(np.random.default_rng(0), 64, "bfloat16", 0).reshape(4, 16), "bfloat16")
    with pytest.raises(ValueError, match="1..16"):
        tk.fixed4_matvec(on_device(rt, "cpu"), torch.zeros(17, 16, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="DOT needs"):
        tk.fixed4_matvec(on_device(rt, "cpu"), torch.zeros(2, 16, dtype=torch.bfloat16), {"DOT": True})


if __name__ == "__main__":  # run by test_fixed4_kernels_in_the_interpreter, or by hand on a GPU machine
    print(check_all("cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"))
    print("ok")
