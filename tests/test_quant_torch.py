"""Affine-quantized weights on torch (dn_torch/quant.py) against dn/formats/quant.py's numpy reference: the matmul on
every layout and path, rows, a quantized folder loaded end to end, and MLX on the same packed tensors."""

import json

import numpy as np
import pytest
import torch
from test_families import VOCAB, H, tiny_model

from dn.core import tensors as safetensors_io
from dn.core.errors import DnError
from dn.core.tolerances import KERNEL, QUANT
from dn.formats import quant as ref
from dn.model.spec import load_spec
from dn.runtime.writer import convert, quantization
from dn_torch import model as tmodel
from dn_torch import quant as tq

M, K = 96, 256  # 96 rows: one full block of torch's int4 pack (64 on AVX-512, 32 on AVX2) and a short one
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FORMATS = [(b, g) for b in ref.BITS for g in ref.GROUP_SIZES]
MANY = max(tq._KERNEL_TOKENS.values()) + 1  # tokens every kernel leaves to the plain path


def _weights(bits, gs, m=M, k=K, seed=0):
    """(QuantizedLinear in the mlx layout with bf16 scales/biases, dense float32 W it stands for)."""
    w = (0.05 * np.random.default_rng(seed).standard_normal((m, k))).astype(np.float32)
    packed, s, b = ref.quantize(w, bits, gs)
    s, b = (safetensors_io.bf16_to_f32(safetensors_io.f32_to_bf16(a)) for a in (s, b))  # as stored
    mod = tq.QuantizedLinear(k, m, False, bits, gs)
    mod.weight = torch.from_numpy(packed)
    mod.scales, mod.biases = (torch.from_numpy(a).bfloat16() for a in (s, b))
    return mod, ref.dequantize(packed, s, b, bits, gs)


def _check(y: torch.Tensor, want: np.ndarray, dtype: str):
    tol = KERNEL[dtype]
    np.testing.assert_allclose(y.float().numpy(), want, rtol=tol.rtol, atol=tol.atol)


def _inputs(k, dtype):
    rng = np.random.default_rng(1)
    for shape in ((1, k), (4, k), (2, 2, k)):
        x = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(DTYPES[dtype])
        yield x, x.float().numpy()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("bits,gs", FORMATS)
def test_plain_path_matches_reference(bits, gs, dtype):
    mod, w = _weights(bits, gs)
    mod.prepare(DTYPES[dtype])
    if dtype == "float32":
        assert tq._kind(mod.weight) == "mlx"  # kernels need 16-bit scales to cost no more bytes
    for x, xn in _inputs(K, dtype):
        _check(tq._plain(x.reshape(-1, K), mod.weight, mod.scales, mod.biases, bits, gs), (xn @ w.T).reshape(-1, M),
               dtype)
        _check(tq.affine_matmul(x, mod.weight, mod.scales, mod.biases, bits, gs), xn @ w.T, dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("bits,gs", [(4, g) for g in ref.GROUP_SIZES] + [(8, g) for g in ref.GROUP_SIZES])
def test_kernel_layout_matches_reference_and_costs_no_more(monkeypatch, bits, gs, dtype):
    mod, w = _weights(bits, gs)
    before = sum(t.numel() * t.element_size() for t in mod.buffers())
    mod.prepare(DTYPES[dtype])
    kind = tq._kind(mod.weight)
    assert kind == {4: "int4", 8: "int8"}[bits]
    assert sum(t.numel() * t.element_size() for t in mod.buffers()) == before
    calls, kernel = [], tq._KERNELS[kind]
    monkeypatch.setitem(tq._KERNELS, kind, lambda *a: calls.append(1) or kernel(*a))
    for x, xn in _inputs(K, dtype):  # at most 4 tokens: the kernel
        _check(mod(x), xn @ w.T, dtype)
    assert len(calls) == 3
    many = torch.from_numpy(np.random.default_rng(2).standard_normal((MANY, K)).astype(np.float32)).to(DTYPES[dtype])
    _check(mod(many), many.float().numpy() @ w.T, dtype)  # more tokens than the kernel takes: the plain path
    assert len(calls) == 3


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_eight_bit_embedding_as_q8_0_blocks(monkeypatch, dtype):
    """An 8-bit embedding in groups of 32 (q4g32e8's, the tied head) is held as GGUF Q8_0 blocks where dn's C
    kernels are built: no more bytes than the int8 layout, its rows and its head's logits the reference's, the
    head one C kernel call for a few tokens and the plain path beyond; a scale that is no float16 keeps int8."""
    from dn.formats import gguf_blocks

    if gguf_blocks.native() is None:
        pytest.skip("dn's C kernels are not built here")
    lin, w = _weights(8, 32)
    emb = tq.QuantizedEmbedding(M, K, 8, 32)
    emb.weight, emb.scales, emb.biases = lin.weight, lin.scales, lin.biases
    before = sum(t.numel() * t.element_size() for t in emb.buffers())
    emb.prepare(DTYPES[dtype])
    assert tq._kind(emb.weight) == "q8_0" and emb.scales is None
    assert sum(t.numel() * t.element_size() for t in emb.buffers()) <= before
    idx = np.array([95, 0, 64, 17, 17])
    _check(emb(torch.as_tensor(idx)), w[idx], dtype)
    calls, kernel = [], tq._KERNELS["q8_0"]
    monkeypatch.setitem(tq._KERNELS, "q8_0", lambda *a: calls.append(1) or kernel(*a))
    for x, xn in _inputs(K, dtype):
        y = emb.as_linear(x, torch.float32)
        assert y.dtype == torch.float32
        _check(y, xn @ w.T, dtype)
    assert len(calls) == 3
    many = torch.from_numpy(np.random.default_rng(2).standard_normal((MANY, K)).astype(np.float32)).to(DTYPES[dtype])
    _check(emb.as_linear(many), many.float().numpy() @ w.T, dtype)
    assert len(calls) == 3
    if dtype == "float16":
        return  # the scales are float16 at this dtype (in both layouts)
    tiny = tq.QuantizedEmbedding(M, K, 8, 32)  # a bf16 scale under float16's normal range: not exact there
    tiny.weight, tiny.biases = lin.weight, lin.biases
    tiny.scales = lin.scales.clone()
    tiny.scales[0, 0] = 1e-7
    tiny.prepare(DTYPES[dtype])
    assert tq._kind(tiny.weight) == "int8"


@pytest.mark.parametrize("bits,gs,dtype", [(3, 64, "float32"), (4, 32, "bfloat16"), (4, 128, "float32"),
                                           (8, 64, "bfloat16"), (6, 32, "bfloat16")])
def test_rows_dequantize_only_those(bits, gs, dtype):
    mod, w = _weights(bits, gs)
    mod.prepare(DTYPES[dtype])
    idx = np.array([95, 0, 64, 63, 64, 17, 80])  # unordered, repeated, both int4 blocks
    got = tq.rows(mod, idx)
    assert got.dtype == DTYPES[dtype] and got.shape == (len(idx), K)
    _check(got, w[idx], dtype)
    dense = torch.nn.Linear(K, M, bias=False)
    assert torch.equal(tq.rows(dense, idx), dense.weight[idx])


def _recording(fn, shapes: list):
    def wrapper(*args):
        out = fn(*args)
        shapes.append(out.shape)
        return out
    return wrapper


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_plain_path_holds_one_bounded_block(monkeypatch, dtype):
    """The plain path never dequantizes more than _BLOCK elements (int4: one packed block of rows) at once."""
    monkeypatch.setattr(tq, "_BLOCK", 2048)
    dense = tq._dense
    for bits in (4, 8, 3):
        mod, w = _weights(bits, 32)
        mod.prepare(DTYPES[dtype])
        limit = K * tq._int4_block_rows() if tq._kind(mod.weight) == "int4" else tq._BLOCK
        sizes = []
        monkeypatch.setattr(tq, "_dense", _recording(dense, sizes))
        x = torch.from_numpy(np.random.default_rng(3).standard_normal((MANY, K)).astype(np.float32))
        _check(tq.affine_matmul(x.to(DTYPES[dtype]), mod.weight, mod.scales, mod.biases, bits, 32),
               x.to(DTYPES[dtype]).float().numpy() @ w.T, dtype)
        assert len(sizes) > 1 and sum(s[0] for s in sizes) == M
        assert max(s[0] * s[1] for s in sizes) <= limit
        monkeypatch.setattr(tq, "_dense", dense)


def test_quantize_model_follows_mlx_lm_rules():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    q = {**ref.params(4, 64), "model.embed_tokens": ref.params(8, 32), "model.layers.0.self_attn.k_proj": False}
    tq.quantize_model(model, q)
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, tq.QuantizedLinear) and layer.self_attn.q_proj.bits == 4
    assert type(layer.self_attn.k_proj) is torch.nn.Linear          # its own entry: False
    assert type(layer.mlp.down_proj) is torch.nn.Linear             # 96 inputs: not a multiple of 64
    emb = model.model.embed_tokens
    assert isinstance(emb, tq.QuantizedEmbedding) and (emb.bits, emb.group_size) == (8, 32)
    assert isinstance(model.lm_head, tq.TiedHead)
    assert emb.weight.shape == (128, 64 * 8 // 32) and emb.weight.dtype == torch.uint32
    with torch.device("meta"):
        other = LlamaForCausalLM(cfg)
    with pytest.raises(DnError, match="mode"):
        tq.quantize_model(other, {**ref.params(4, 64), "mode": "mxfp4"})


def _dequantized_twin(qdir, out, dtype="float32"):
    """A dense float32 folder holding exactly the weights a quantized folder stands for at dtype (where a kernel
    runs at a 16-bit dtype, float16 stored scales and biases rounded to it, as the kernel holds them)."""
    stored = {}
    for f in sorted(qdir.glob("*.safetensors")):
        stored |= safetensors_io.load(f)
    cfg = json.loads((qdir / "config.json").read_text())
    mods = ref.layout(cfg["quantization"], stored)
    f32 = {n: safetensors_io.bf16_to_f32(a) if dt == "BF16" else np.asarray(a, np.float32)
           for n, (a, dt) in stored.items() if dt != "U32"}
    dense = {n: a for n, a in f32.items() if not n.endswith((".scales", ".biases"))}
    for path, q in mods.items():
        if q:
            s, b = f32[path + ".scales"], f32[path + ".biases"]
            if tq._kernel_layout(len(s), q["bits"], q["group_size"], getattr(torch, dtype), torch.device("cpu")):
                s, b = (safetensors_io.convert(safetensors_io.convert(a, "float32", dtype), dtype, "float32")
                        for a in (s, b))
            dense[path + ".weight"] = ref.dequantize(np.asarray(stored[path + ".weight"][0]), s, b, q["bits"],
                                                     q["group_size"])
    out.mkdir()
    safetensors_io.save(dense, out / "model.safetensors")
    for k in ("quantization", "quantization_config"):
        cfg.pop(k)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("model_type,bits,gs", [("llama", 4, 64), ("qwen2", 8, 32), ("mistral", 3, 32)])
def test_quantized_folder_loads_and_matches_its_dequantized_twin(monkeypatch, tmp_path, model_type, bits, gs):
    monkeypatch.setattr(tq, "_REPACK", 64 * H)  # packed weights read from the file in several chunks of rows
    dense = tiny_model(tmp_path / "dense", model_type)
    qdir = tmp_path / "q"
    convert(dense, qdir, None, None, quantization(bits, gs, 8, 32))  # embedding: its own entry
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, VOCAB, size=(1, MANY)), rng.integers(0, VOCAB, size=(1, 4))]  # plain, kernels
    for dtype in ("float32", "bfloat16"):
        twin = _dequantized_twin(qdir, tmp_path / f"twin-{dtype}", dtype)
        model, dense = tmodel.load(qdir, load_spec(qdir), dtype), tmodel.load(twin, load_spec(twin), dtype)
        floats = [n for n, t in model.state_dict().items() if t.is_floating_point() and t.dim() == 2
                  and "layers" in n and not n.endswith(("scales", "biases"))]
        assert all("down_proj" in n for n in floats), floats  # only modules the group size does not divide
        for tokens in batches:
            got, want = tmodel.logits(model, tokens), tmodel.logits(dense, tokens)
            err = np.abs(got - want).max() / np.abs(want).max()
            assert err < QUANT[dtype], (dtype, tokens.shape, err)
        model.tie_weights()  # transformers re-tying must not break the quantized head
        assert np.array_equal(tmodel.logits(model, tokens), got)
        head = model.get_output_embeddings()  # float32 logits at any compute dtype: bf16 ones tie top tokens
        hidden = torch.ones(1, 2, H, dtype=tmodel.DTYPES[dtype])
        assert head(hidden).dtype == torch.float32 and head(hidden.repeat(1, MANY, 1)).dtype == torch.float32


def test_quantized_folder_with_a_wrong_tensor_is_a_one_line_error(tmp_path):
    dense = tiny_model(tmp_path / "dense", "llama")
    qdir = tmp_path / "q"
    convert(dense, qdir, None, None, quantization(4, 64))
    spec = load_spec(qdir)
    spec.quant = {**spec.quant, "bits": 8}  # the stored codes are 4-bit: the packed shapes disagree
    with pytest.raises(DnError, match="the model expects"):
        tmodel.load(qdir, spec, "float32")


@pytest.mark.parametrize("bits,gs", FORMATS)
def test_mlx_and_torch_agree_on_the_same_packed_tensors(bits, gs):
    mx = pytest.importorskip("mlx.core")
    from dn_mlx import quant as mq

    w = (0.05 * np.random.default_rng(4).standard_normal((M, K))).astype(np.float32)
    packed, s, b = mx.quantize(mx.array(w), group_size=gs, bits=bits)  # mlx's own packing
    x = np.random.default_rng(5).standard_normal((3, K)).astype(np.float32)
    want = np.array(mq.affine_matmul(mx.array(x), packed, s, b, bits, gs))
    got = tq.affine_matmul(torch.from_numpy(x), *(torch.from_numpy(np.array(a)) for a in (packed, s, b)), bits, gs)
    _check(got, want, "float32")
