"""GGUF blocks computed on as they are: the C kernel (dn/formats/csrc/gguf.c) against the numpy reference
(dn.formats.gguf_blocks.decode, bit-exact with gguf.quants.dequantize), and torch's block modules (dn_torch/gguf.py)
in a native GGUF folder against the same model with its decoded weights dense."""

import ctypes
import json
import subprocess

import numpy as np
import pytest
from helpers import native_or_skip

from dn import api
from dn.core import tensors
from dn.core.tolerances import GGUF_Q8, KERNEL, QUANT
from dn.formats import gguf_blocks as gb
from dn.formats import native
from dn.model import store
from dn.model.sources import resolve_model
from dn.model.spec import load_spec

torch = pytest.importorskip("torch")
tg = pytest.importorskip("dn_torch.gguf")
from dn_torch import model as torch_model  # noqa: E402  (after the skip: torch is optional)
from dn_torch.ops import DTYPES  # noqa: E402

FP16_AT = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82),
           "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}  # byte offsets of d (and dmin / m)


def random_blocks(name, rows, cols, rng, scale=None):
    """Random blocks uint8 [rows, row_bytes] of dense [rows, cols]. scale None: any finite fp16 d (and dmin / m),
    subnormals and negatives too; else d drawn so that the weights' spread is about `scale`."""
    _, bw, bb = gb.TYPES[name]
    raw = rng.integers(0, 256, (rows * cols // bw, bb), dtype=np.uint8)
    for at in FP16_AT[name]:
        bits = rng.integers(0, 1 << 16, len(raw), dtype=np.uint16)
        bits[(bits & 0x7C00) == 0x7C00] &= 0x83FF  # inf/nan exponent -> a finite one
        if scale is not None:
            bits = np.ones(len(raw), np.float16).view(np.uint16)
        raw[:, at:at + 2] = bits.view(np.uint8).reshape(-1, 2)
    if scale is not None:  # the weights scale with d (and dmin): d = 1 measured, then rescaled
        unit = gb.decode(name, raw).std()
        d = (scale / unit * rng.uniform(0.5, 1.5, len(raw))).astype(np.float16)
        for at in FP16_AT[name]:
            raw[:, at:at + 2] = d.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def _cases():
    return [(name, 12 if name.endswith("_K") else 3) for name in gb.TYPES]  # k = 3072 or 96


@pytest.fixture(scope="module")
def lib():
    return native_or_skip(gb.native)


@pytest.mark.parametrize("name,blocks", _cases())
def test_kernel_rows_bit_exact(lib, name, blocks):
    rng = np.random.default_rng(sorted(gb.TYPES).index(name))
    k = blocks * gb.TYPES[name][1]
    raw = random_blocks(name, 37, k, rng)
    w = gb.decode(name, raw)
    out = np.full_like(w, np.nan)
    gb.rows_native(lib, name, raw, None, out)
    assert np.array_equal(out.view(np.uint32), w.view(np.uint32)), name  # bit for bit, signs of 0 too
    idx = np.array([5, 0, 36, 5, 17], np.int64)
    picked = np.full((len(idx), k), np.nan, np.float32)
    gb.rows_native(lib, name, raw, idx, picked, threads=2)
    assert np.array_equal(picked.view(np.uint32), w[idx].view(np.uint32)), name


@pytest.mark.parametrize("name,blocks", _cases())
@pytest.mark.parametrize("tokens", [1, 5, 11])
def test_kernel_matmul(lib, name, blocks, tokens):
    rng = np.random.default_rng(100 + sorted(gb.TYPES).index(name))
    k = blocks * gb.TYPES[name][1]
    raw = random_blocks(name, 53, k, rng, scale=0.05)
    x = rng.standard_normal((tokens, k), np.float32)
    want = x @ gb.decode(name, raw).T
    for threads in (1, 3):
        y = np.full((tokens, 53), np.nan, np.float32)
        gb.matmul_native(lib, name, raw, x, y, threads)
        tol = KERNEL["float32"]
        np.testing.assert_allclose(y, want, rtol=tol.rtol, atol=tol.atol * np.abs(want).max(), err_msg=name)


def test_plain_c_beside_avx512(lib, tmp_path):
    """The portable loops (built without AVX-512, as on a CPU without it) against the reference too."""
    out = tmp_path / "gguf_plain.so"
    r = subprocess.run([native._compiler(), *native.FLAGS, "-mno-avx512f", str(native.SRC / "gguf.c"), "-o", str(out),
                        "-lm"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    plain = ctypes.CDLL(str(out))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    plain.dn_gguf_matmul.argtypes, plain.dn_gguf_rows.argtypes = [i32, p, i64, i64, p, i64, p, i32], [i32, p, i64, p,
                                                                                                      i64, p, i32]
    assert plain.dn_gguf_isa() == 0 and plain.dn_gguf_q8_types() == 0
    rng = np.random.default_rng(5)
    for name, blocks in _cases():
        k = blocks * gb.TYPES[name][1]
        raw = random_blocks(name, 19, k, rng)
        w = gb.decode(name, raw)
        out = np.full_like(w, np.nan)
        gb.rows_native(plain, name, raw, None, out)
        assert np.array_equal(out.view(np.uint32), w.view(np.uint32)), name
        raw = random_blocks(name, 19, k, rng, scale=0.05)
        x, y = rng.standard_normal((3, k), np.float32), np.empty((3, 19), np.float32)
        gb.matmul_native(plain, name, raw, x, y, 2)
        want = x @ gb.decode(name, raw).T
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=name)


def test_fast_path_is_what_runs_here(lib):
    if "avx512f" not in native._cpu_flags().split():
        pytest.skip("no AVX-512 here: the plain loops run")
    assert lib.dn_gguf_isa() == 1


def test_kernel_rejects_unknown_type(lib):
    raw, x, y = np.zeros((2, 18), np.uint8), np.zeros((1, 32), np.float32), np.zeros((1, 2), np.float32)
    assert lib.dn_gguf_matmul(99, gb.ptr(raw), 2, 32, gb.ptr(x), 1, gb.ptr(y), 1) == -1


# ---- the integer path: x in 8 bits per 32 values, VNNI dots (llama.cpp's route) ------------------------------

Q8 = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]  # Q2_K, Q3_K: the float kernel


@pytest.fixture(scope="module")
def q8(lib):
    if not lib.q8:
        pytest.skip("no AVX512_VNNI here: bfloat16 takes the float kernel (test_q8_dispatch covers that)")
    return lib


def _bits(x):  # float32 -> bfloat16 bits (truncated: the reference reads the same bits back)
    return (x.view(np.uint32) >> 16).astype(np.uint16)


def _widen(b):
    return (b.astype(np.uint32) << 16).view(np.float32)


def test_q8_present_where_cpuid_says(lib):
    vnni = {"avx512_vnni", "avx512bw", "avx512vl"} <= set(native._cpu_flags().split())
    assert lib.q8 == (frozenset(Q8) if vnni else frozenset())


def test_q8_quantize_is_numpy(q8):
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((9, 32)) * 10.0 ** rng.uniform(-3, 3, (9, 1))).astype(np.float32)
    x[1] = 0  # amax 0: codes 0, scale 0
    x[2] = rng.integers(-60, 60, 32) + 0.5  # amax 127: x * 127 / amax = x, halves: ties to even
    x[2, 0] = 127
    x = x.ravel()
    for bf16 in (False, True):
        xin = _bits(x) if bf16 else x
        q, dx = np.empty(x.size, np.int8), np.empty(x.size // 32, np.float32)
        assert q8.dn_gguf_quantize_q8(gb.ptr(xin), bf16, x.size, gb.ptr(q), gb.ptr(dx)) == 0
        wq, wdx = gb.quantize_q8(_widen(xin) if bf16 else x)
        assert np.array_equal(q, wq) and np.array_equal(dx.view(np.uint32), wdx.view(np.uint32))
    assert wq[64] == 127 and (wq[65:96] % 2 == 0).all()


@pytest.mark.parametrize("name", Q8)
@pytest.mark.parametrize("tokens", [1, 3, 6])
def test_q8_matmul(q8, name, tokens):
    """The numpy reference of the same arithmetic (x's 8-bit copy @ decode(W).T) to float rounding, and float32's
    x @ decode(W).T within GGUF_Q8. 19 32-weight blocks: a pair and a 16-block group left part-full."""
    rng = np.random.default_rng(200 + Q8.index(name))
    k = 3 * 256 if name.endswith("_K") else 19 * 32
    raw = random_blocks(name, 37, k, rng, scale=0.05)
    x = rng.standard_normal((tokens, k), np.float32) * rng.uniform(0.1, 10, (tokens, 1)).astype(np.float32)
    x[0, :32] = 0
    want, full = gb.matmul_q8(name, raw, x), x @ gb.decode(name, raw).T
    tol = KERNEL["float32"]
    for threads in (1, 3):
        y = np.full((tokens, 37), np.nan, np.float32)
        gb.matmul_q8_native(q8, name, raw, x, y, threads)
        np.testing.assert_allclose(y, want, rtol=tol.rtol, atol=tol.atol * np.abs(want).max(), err_msg=name)
    assert _rel(y, full) <= GGUF_Q8, name
    assert _rel(want, full) > 10 * tol.rtol  # the reference is x in 8 bits, not x


@pytest.mark.parametrize("name", ["Q4_1", "Q6_K"])
def test_q8_bf16_and_bias(q8, name):
    """bfloat16 x; y and its bias bfloat16 (one rounding of the float sum) or float32 (a head's logits)."""
    rng = np.random.default_rng(9)
    k, m = 512, 45
    raw = random_blocks(name, m, k, rng, scale=0.05)
    xb, bias = _bits(rng.standard_normal((2, k), np.float32)), _bits(rng.standard_normal(m, np.float32))
    want = gb.matmul_q8(name, raw, _widen(xb)) + _widen(bias)
    y = np.zeros((2, m), np.uint16)
    gb.matmul_q8_native(q8, name, raw, xb, y, bf16=gb.BF16_X | gb.BF16_Y, bias=bias)
    rounded = torch.from_numpy(want).bfloat16().float().numpy()
    np.testing.assert_allclose(_widen(y), rounded, rtol=2 ** -8, atol=1e-6)  # one rounding apart at most
    y32 = np.zeros((2, m), np.float32)
    gb.matmul_q8_native(q8, name, raw, xb, y32, bf16=gb.BF16_X, bias=_widen(bias))
    np.testing.assert_allclose(y32, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_q8_dispatch(lib, monkeypatch):
    """bfloat16 x takes the integer path where lib.q8 has the type, else the float kernel (no VNNI, or Q2_K/Q3_K);
    float32 x always the float kernel (exact: the float32 parity gate)."""
    calls = []

    class Spy:
        q8 = frozenset(lib.q8)

        def __getattr__(self, name):
            calls.append(name)
            return getattr(lib, name)

    rng = np.random.default_rng(4)
    for name in ("Q4_K", "Q3_K"):
        raw = torch.from_numpy(random_blocks(name, 16, 256, rng, scale=0.05))
        x = torch.from_numpy(rng.standard_normal((1, 256), np.float32))
        for dtype, cpu_has in ((torch.bfloat16, True), (torch.bfloat16, False), (torch.float32, True)):
            Spy.q8 = frozenset(lib.q8) if cpu_has else frozenset()
            calls.clear()
            y = tg.matmul(x.to(dtype), raw, name, Spy())
            int_path = dtype == torch.bfloat16 and name in Spy.q8
            assert calls == ["dn_gguf_matmul_q8" if int_path else "dn_gguf_matmul"], (name, dtype, cpu_has)
            assert y.dtype == dtype
            if not int_path:  # the float kernel's own result, rounded once
                want = np.empty((1, 16), np.float32)
                gb.matmul_native(lib, name, raw.numpy(), x.to(dtype).float().numpy(), want)
                assert torch.equal(y, torch.from_numpy(want).to(dtype))
    if lib.q8:
        raw = np.zeros((2, 144), np.uint8)
        assert lib.dn_gguf_matmul_q8(11, gb.ptr(raw), 2, 256, gb.ptr(np.zeros((1, 256), np.float32)), 1,
                                     gb.ptr(np.zeros((1, 2), np.float32)), None, 0, 1) == -3  # Q3_K


def test_kernel_threads_share_one_pool(lib):
    """Two callers at once (ctypes lets go of the GIL): one gets the pool, the other runs alone; both exact."""
    import threading

    rng = np.random.default_rng(8)
    raw = random_blocks("Q4_K", 300, 512, rng, scale=0.05)
    xs = [rng.standard_normal((2, 512), np.float32) for _ in range(4)]
    ys = [np.empty((2, 300), np.float32) for _ in xs]
    work = [threading.Thread(target=gb.matmul_native, args=(lib, "Q4_K", raw, x, y, 2)) for x, y in zip(xs, ys)]
    for w in work:
        w.start()
    for w in work:
        w.join()
    for x, y in zip(xs, ys):
        np.testing.assert_allclose(y, x @ gb.decode("Q4_K", raw).T, rtol=1e-5, atol=1e-5 * np.abs(y).max())


def test_q8_compiled_out_without_vnni(lib, tmp_path):
    """Built for a CPU without AVX512_VNNI, the library reports no integer types and refuses the call."""
    out = tmp_path / "gguf_novnni.so"
    r = subprocess.run([native._compiler(), *native.FLAGS, "-mno-avx512vnni", str(native.SRC / "gguf.c"), "-o",
                        str(out), "-lm"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    plain = ctypes.CDLL(str(out))
    plain.dn_gguf_matmul_q8.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                        ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    assert plain.dn_gguf_q8_types() == 0
    raw, x, y = np.zeros((2, 144), np.uint8), np.zeros((1, 256), np.float32), np.zeros((1, 2), np.float32)
    assert plain.dn_gguf_matmul_q8(12, gb.ptr(raw), 2, 256, gb.ptr(x), 1, gb.ptr(y), None, 0, 1) == -3


# ---- torch's block modules ----------------------------------------------------------------------------------

@pytest.fixture(params=["native", "plain"])
def path(request, monkeypatch):
    """The C kernel, or the plain path (DN_NATIVE=0: numpy's decode a chunk of rows at a time, torch's matmul)."""
    if request.param == "plain":
        monkeypatch.setenv("DN_NATIVE", "0")
    elif gb.native() is None:
        native_or_skip(gb.native)
    return request.param


@pytest.mark.parametrize("name", list(gb.TYPES))
def test_torch_linear_and_embedding(path, name, monkeypatch):
    rng = np.random.default_rng(7)
    k = 512
    raw = random_blocks(name, 40, k, rng, scale=0.05)
    w = gb.decode(name, raw)
    blocks = torch.from_numpy(raw)
    monkeypatch.setattr(tg, "_BLOCK", 7 * k)  # several row blocks on the prefill path
    monkeypatch.setattr(tg, "_KERNEL_TOKENS", 8)
    for tokens in (1, 5, 12):  # 12: above _KERNEL_TOKENS, decoded rows and torch's matmul
        x = rng.standard_normal((1, tokens, k), np.float32)
        y = tg.matmul(torch.from_numpy(x), blocks, name)
        assert y.shape == (1, tokens, 40) and y.dtype == torch.float32
        want = x[0] @ w.T
        np.testing.assert_allclose(y[0].numpy(), want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=name)
        yb = tg.matmul(torch.from_numpy(x).bfloat16(), blocks, name)
        assert yb.dtype == torch.bfloat16
        np.testing.assert_allclose(yb[0].float().numpy(), want, rtol=0.05, atol=0.05 * np.abs(want).max())
    ids = torch.tensor([[3, 0], [39, 3]])
    emb = tg.GGUFEmbedding(40, k, name, torch.float32)
    emb.weight = blocks
    got = emb(ids)
    assert got.shape == (2, 2, k) and np.array_equal(got.numpy().view(np.uint32), w[ids.numpy()].view(np.uint32))
    with pytest.raises(IndexError):
        emb(torch.tensor([40]))


# ---- a native GGUF folder: a tiny llama of random blocks ----------------------------------------------------

H, INTER, LAYERS, HEADS, KV, HD, VOCAB = 256, 512, 2, 4, 2, 64, 320
ORDER = list(gb.TYPES)


def _gguf_folder(root, tied=True):
    """(native folder, dense folder of the same weights decoded to float32): every type on some module."""
    rng = np.random.default_rng(3)
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": H,
           "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
           "num_key_value_heads": KV, "head_dim": HD, "vocab_size": VOCAB, "rms_norm_eps": 1e-6,
           "max_position_embeddings": 128, "tie_word_embeddings": tied,
           "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    mats = {"model.embed_tokens": (VOCAB, H)} | ({} if tied else {"lm_head": (VOCAB, H)})
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        mats |= {p + "self_attn.q_proj": (HEADS * HD, H), p + "self_attn.k_proj": (KV * HD, H),
                 p + "self_attn.v_proj": (KV * HD, H), p + "self_attn.o_proj": (H, HEADS * HD),
                 p + "mlp.gate_proj": (INTER, H), p + "mlp.up_proj": (INTER, H), p + "mlp.down_proj": (H, INTER)}
    types = {path: ORDER[j % len(ORDER)] for j, path in enumerate(mats)}
    native, dense = {}, {}
    for path, shape in mats.items():
        raw = random_blocks(types[path], *shape, rng, scale=0.5 if "embed" in path else 0.05)
        native[path + ".weight"] = raw
        dense[path + ".weight"] = gb.decode(types[path], raw)
    for name in ["model.norm.weight"] + [f"model.layers.{i}.{n}_layernorm.weight" for i in range(LAYERS)
                                        for n in ("input", "post_attention")]:
        native[name] = dense[name] = (1 + 0.1 * rng.standard_normal(H)).astype(np.float32)
    out = []
    for kind, weights, extra in (("native", native, {"gguf_quantization": types}), ("dense", dense, {})):
        (root / kind).mkdir()
        tensors.save(weights, root / kind / "model.safetensors")
        (root / kind / "config.json").write_text(json.dumps(cfg | extra))
        out.append(root / kind)
    return out


def _logits(folder, dtype, tokens):
    spec = load_spec(folder)
    model = torch_model.load(folder, spec, dtype)
    return model, torch_model.logits(model, tokens)


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("tied", [True, False])
def test_native_folder_logits(tmp_path, path, tied, monkeypatch):
    monkeypatch.setattr(tg, "_KERNEL_TOKENS", 8)
    native, dense = _gguf_folder(tmp_path, tied)
    spec = load_spec(native)
    assert spec.gguf and set(spec.gguf.values()) == set(gb.TYPES)
    tokens = np.random.default_rng(0).integers(0, VOCAB, (1, 12))
    for dtype in ("float32", "bfloat16"):
        model, got = _logits(native, dtype, tokens)
        _, want = _logits(dense, dtype, tokens)
        assert _rel(got, want) <= QUANT[dtype], dtype  # prefill: 12 tokens, decoded rows and torch's matmul
        step = torch_model.logits(model, tokens[:, :4])  # few tokens: the kernel
        assert _rel(step, want[:, :4]) <= QUANT[dtype], dtype
        head = model.get_output_embeddings()(torch.ones(1, 1, H, dtype=DTYPES[dtype]))
        assert head.dtype == torch.float32  # logits in float32 at any compute dtype, as dn_torch.quant's heads
    held = {name: b for name, b in model.named_buffers() if b.dtype == torch.uint8}
    assert all(isinstance(model.get_submodule(n.rpartition(".")[0]), tg._Blocks) for n in held)
    blocks = [e for e in store.entries(spec) if e.format == "gguf"]
    assert len(blocks) == len(held) == len(spec.gguf)  # a tied head: the embedding's blocks, held once
    assert sum(b.numel() for b in held.values()) == sum(e.nbytes(4) for e in blocks)
    assert not any(p.is_floating_point() and p.dim() == 2 for p in model.parameters())  # nothing widened


def test_native_folder_reads_each_tensor_once(tmp_path, monkeypatch):
    native, _ = _gguf_folder(tmp_path)
    spec = load_spec(native)
    opened, read = [], {}
    real_open, real_rows = tensors._open, tensors.File._rows

    def counted_rows(self, name, r0=0, r1=None):
        a = real_rows(self, name, r0, r1)
        read[name] = read.get(name, 0) + a.nbytes
        return a

    monkeypatch.setattr(tensors, "_open", lambda p: opened.append(p.name) or real_open(p))
    monkeypatch.setattr(tensors.File, "_rows", counted_rows)
    torch_model.load(native, spec, "float32")
    assert opened == ["model.safetensors"]
    header, _ = tensors.read_header(native / "model.safetensors")
    assert read == {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()}


# ---- the default model's native folder ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def default_native():
    return resolve_model(None, progress=False)


def test_default_model_native_is_its_widening(default_native, default_model_dir, monkeypatch):
    """float32 on torch: the native folder (exact weights) against the dense widening (every weight rounded to bf16)
    differs by that rounding only: rounded the same way, the two compute the same logits."""
    if gb.native() is None:
        native_or_skip(gb.native)
    spec = load_spec(default_native)
    assert spec.gguf and {"Q4_1", "Q8_0"} <= set(spec.gguf.values())
    ids = np.array([[1, 504, 3575, 282, 4649, 314, 7042, 30, 378, 3575, 282, 6391, 314]])
    monkeypatch.setattr(tg, "_KERNEL_TOKENS", 8)  # 13 tokens: the prefill path
    native = torch_model.load(default_native, spec, "float32")
    dense = torch_model.load(default_model_dir, load_spec(default_model_dir), "float32")
    want = torch_model.logits(dense, ids)
    del dense
    assert _rel(torch_model.logits(native, ids), want) <= QUANT["bfloat16"]  # prefill: decoded rows
    assert _rel(torch_model.logits(native, ids[:, :6]), want[:, :6]) <= QUANT["bfloat16"]  # the kernel
    with torch.no_grad():
        for p in native.parameters():  # the norms: float32 in the GGUF, bf16 in the widening
            p.copy_(p.bfloat16().float())
    real = tg.rows
    monkeypatch.setattr(tg, "rows", lambda raw, kind, idx, dtype: real(raw, kind, idx, torch.bfloat16).to(dtype))
    monkeypatch.setattr(tg, "_KERNEL_TOKENS", -1)
    assert _rel(torch_model.logits(native, ids), want) <= QUANT["float32"]


def test_default_model_native_answers(default_native):
    loaded = api.load(str(default_native), backend="torch", dtype="float32")
    assert "Paris" in api.generate(loaded, "What is the capital of France?", max_tokens=12)
