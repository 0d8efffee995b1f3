"""Quantized weights (mlx-lm's affine format): dn/formats/quant.py's min/max grid (its error bound, exact grids, mlx
reading its tensors), the sparse int4 sketches unchanged, `dn convert -q` writing mlx-lm's layout, and quantized
folders on both backends."""

from __future__ import annotations

import importlib
import json
import shutil

import numpy as np
import pytest
from helpers import assert_one_line_error
from helpers import run_dn as dn
from test_families import VOCAB, tiny_model

from dn.core import tensors
from dn.core.errors import DnError
from dn.core.tolerances import KERNEL, QUANT
from dn.formats import quant, sparse
from dn.model.spec import SPEC_FILE, load_spec
from dn.runtime.writer import EMBEDDING, convert, quantization

ALL = [(b, g) for b in quant.BITS for g in quant.GROUP_SIZES]


def _weights(rng, m=40, k=256):
    """Rows of different scales, plus the corner cases: all zero, constant, all negative."""
    w = rng.standard_normal((m, k)) * rng.uniform(0.01, 2, (m, 1))
    w[0], w[1], w[2] = 0, 0.5, -np.abs(w[2])
    return w.astype(np.float32)


def _as_bf16(a):
    """float32 -> float32 holding its bf16 rounding: a scale or bias as convert stores it for a bf16 weight."""
    return tensors.bf16_to_f32(tensors.f32_to_bf16(a))


@pytest.mark.parametrize(("bits", "group_size"), ALL)
def test_dequantize_round_trip(bits, group_size):
    """Codes round-trip through pack/unpack; every weight is within half a step of its dequantized value (plus,
    with bf16-stored scales and biases, what their rounding moves the grid); constant groups are exact and no
    scale is 0."""
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, (3, 4 * group_size), dtype=np.uint8)
    np.testing.assert_array_equal(quant.unpack(quant.pack(codes, bits), bits, codes.shape[1]), codes)
    w = _weights(rng)
    packed, scales, biases = quant.quantize(w, bits, group_size)
    assert scales.dtype == biases.dtype == np.float32 and (scales > 0).all()
    n = len(w)
    err = np.abs(w - quant.dequantize(packed, scales, biases, bits, group_size)).reshape(n, -1, group_size)
    half = scales[..., None] / 2
    assert (err <= half * (1 + 1e-5) + 1e-7).all()
    assert err[:2].max() == 0  # zero and constant rows are exact
    s, b = _as_bf16(scales), _as_bf16(biases)
    err = np.abs(w - quant.dequantize(packed, s, b, bits, group_size)).reshape(n, -1, group_size)
    moved = np.abs(b - biases)[..., None] + ((1 << bits) - 1) * np.abs(s - scales)[..., None]
    assert (err <= (half + moved) * (1 + 1e-5) + 1e-7).all()


@pytest.mark.parametrize(("bits", "group_size"), ALL)
def test_a_weight_on_a_min_max_grid_round_trips_exactly(bits, group_size):
    """Random codes (each group's 0 and 2^bits - 1 among them) times a random scale plus a random min, all
    exactly representable in bf16 and their products in float32: quantize finds those codes, scales and biases,
    and dequantize gives the weight back bit for bit (as GGUF Q4_1 blocks keep their grid at 4 bits, 32)."""
    rng = np.random.default_rng(100 * bits + group_size)
    m, groups, top = 8, 4, (1 << bits) - 1
    codes = rng.integers(0, top + 1, (m, groups, group_size))
    codes[..., 0], codes[..., -1] = 0, top
    codes = rng.permuted(codes, axis=-1)
    scale = (rng.integers(1, 128, (m, groups)) * 2.0 ** -12).astype(np.float32)
    low = (rng.integers(-255, 256, (m, groups)) * 2.0 ** -9).astype(np.float32)
    w = (codes * scale[..., None] + low[..., None]).astype(np.float32).reshape(m, -1)
    packed, scales, biases = quant.quantize(w, bits, group_size)
    np.testing.assert_array_equal(quant.unpack(packed, bits, w.shape[1]), codes.reshape(m, -1))
    np.testing.assert_array_equal(scales, scale)
    np.testing.assert_array_equal(biases, low)
    np.testing.assert_array_equal(_as_bf16(scales), scales)  # stored as bf16 without moving the grid
    np.testing.assert_array_equal(_as_bf16(biases), biases)
    np.testing.assert_array_equal(quant.dequantize(packed, scales, biases, bits, group_size), w)


@pytest.mark.parametrize(("bits", "group_size"), ALL)
def test_mlx_reads_the_layout(bits, group_size):
    """mx.dequantize of dn's packed codes, scales and biases is dn's dequantize, and the packed tensors have
    mx.quantize's dtypes and shapes (the values differ: dn fits another grid)."""
    mx = pytest.importorskip("mlx.core")
    w = _weights(np.random.default_rng(bits * 1000 + group_size))
    ours = quant.quantize(w, bits, group_size)
    ref = [np.array(a) for a in mx.quantize(mx.array(w), group_size, bits, stream=mx.cpu)]
    assert [(a.dtype, a.shape) for a in ours] == [(a.dtype, a.shape) for a in ref]
    deq = mx.dequantize(*(mx.array(a) for a in ours), group_size=group_size, bits=bits, stream=mx.cpu)
    np.testing.assert_array_equal(np.array(deq), quant.dequantize(*ours, bits, group_size))


def _old_quantize_int4(w):
    """dn/formats/sparse.py's quantize_int4 before dn/formats/quant.py: the bytes the sparse file format v2 holds."""
    m, d = w.shape
    g = w.reshape(m, d // sparse.GROUP, sparse.GROUP)
    s = np.abs(g).max(-1) / 7 + 1e-12
    q = (np.clip(np.round(g / s[..., None]), -7, 7).astype(np.int8) + 8).astype(np.uint8).reshape(m, d)
    return q[:, 0::2] | (q[:, 1::2] << 4), s.astype(np.float32)


def _old_dequantize_int4(packed, s):
    m = packed.shape[0]
    q = np.empty((m, packed.shape[1] * 2), np.float32)
    q[:, 0::2], q[:, 1::2] = (packed & 15).astype(np.float32) - 8, (packed >> 4).astype(np.float32) - 8
    return (q.reshape(m, -1, sparse.GROUP) * s[..., None]).reshape(m, -1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sparse_int4_is_unchanged(dtype):
    w = _weights(np.random.default_rng(7), 96, 192).astype(dtype)
    packed, scales = sparse.quantize_int4(w)
    old_packed, old_scales = _old_quantize_int4(w)
    assert packed.dtype == np.uint8 and scales.dtype == np.float32
    np.testing.assert_array_equal(packed, old_packed)
    np.testing.assert_array_equal(scales, old_scales)
    np.testing.assert_array_equal(sparse.dequantize_int4(packed, scales), _old_dequantize_int4(packed, scales))
    _, _, biases = quant.quantize_symmetric(w, 4, sparse.GROUP)   # the same codes read as affine
    np.testing.assert_allclose(quant.dequantize(packed, scales, biases, 4, sparse.GROUP),
                               _old_dequantize_int4(packed, scales), rtol=1e-6, atol=1e-7)


def test_unsupported_parameters_are_one_line():
    for bits, group_size, needle in ((5, 64, "bits 5"), (4, 48, "group size 48")):
        with pytest.raises(DnError, match=needle) as e:
            quant.check(bits, group_size)
        assert "\n" not in str(e.value)
    with pytest.raises(DnError, match="mode 'mxfp4'"):
        quant.check_config({"group_size": 32, "bits": 4, "mode": "mxfp4"})
    with pytest.raises(DnError, match=f"bits 5 for {EMBEDDING}"):
        quant.check_config(quant.params(4, 64) | {EMBEDDING: quant.params(5, 64)})


def _framework(backend_name):
    """numpy -> the backend's array type."""
    if backend_name == "mlx":
        import mlx.core as mx

        return mx.array
    import torch

    return torch.from_numpy


def _backend_quant(backend_name):
    """dn_<backend>.quant. The backend_name fixture has already skipped where the framework (torch, mlx) is not
    installed, so an ImportError here is the project's own code failing: the test fails, it does not skip."""
    return importlib.import_module(f"dn_{backend_name}.quant")


@pytest.mark.parametrize(("bits", "group_size"), [(2, 128), (3, 32), (4, 64), (6, 32), (8, 128)])
def test_affine_matmul_matches_numpy(backend_name, bits, group_size):
    bq, to = _backend_quant(backend_name), _framework(backend_name)
    rng = np.random.default_rng(3)
    w, x = _weights(rng, 48, 256) / 16, rng.standard_normal((5, 256)).astype(np.float32)
    stored = quant.quantize(w, bits, group_size)
    ref = x.astype(np.float64) @ quant.dequantize(*stored, bits, group_size).T.astype(np.float64)
    y = bq.affine_matmul(to(x), *(to(a) for a in stored), bits, group_size)
    tol = KERNEL["float32"]
    np.testing.assert_allclose(np.array(y), ref, rtol=tol.rtol, atol=tol.atol)


# ---- dn convert -q ---------------------------------------------------------------------------------------

def _source(tmp_path, model_type, default_model_dir):
    """A tiny random model with the default model's tokenizer (mlx_lm.load wants one) and an explicit rope_theta
    (mlx-lm reads no other key), so mlx-lm runs it as dn does."""
    src = tiny_model(tmp_path / "dense", model_type)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(default_model_dir / name, src / name)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(cfg | {"rope_theta": cfg["rope_parameters"]["rope_theta"]}))
    if cfg["tie_word_embeddings"]:  # some tied checkpoints store the lm_head too; mlx-lm drops it
        stored = tensors.load(src / "model.safetensors", mmap=False)
        tensors.save(stored | {"lm_head.weight": stored["model.embed_tokens.weight"]}, src / "model.safetensors")
    return src


def _mlx_lm_quantized(src, q):
    """mlx-lm's own conversion of src (mlx_lm.convert: cast to the config's dtype, quantize_model)."""
    import mlx.core as mx
    from mlx_lm.utils import load_model, quantize_model

    model, config = load_model(src, lazy=True)
    model.set_dtype(mx.bfloat16)
    emb = q.get(EMBEDDING)
    return quantize_model(model, config, q["group_size"], q["bits"],
                          quant_predicate=lambda p, m: emb if emb and p == EMBEDDING else True)


def _logits(model, tokens):
    import mlx.core as mx

    return np.array(model(mx.array(tokens)).astype(mx.float32))


TOKENS = np.random.default_rng(1).integers(0, VOCAB, size=(1, 16))
# untied (a quantized lm_head) with 4-bit groups of 32 and an 8-bit embedding; tied with q/k/v biases and
# 3-bit groups of 64, which leave down_proj (input 96) dense, as mlx-lm does
CASES = [("mistral", quantization(4, 32, 8, 64)), ("qwen2", quantization(3, 64))]


@pytest.mark.parametrize(("model_type", "q"), CASES)
def test_convert_writes_mlx_lm_layout(tmp_path, default_model_dir, model_type, q):
    """dn convert -q writes the tensors mlx-lm's own conversion writes (names, dtypes, shapes) and its config's
    quantization dict; mlx_lm.load runs the folder with dn's logits; and dn runs the folder mlx-lm wrote (no
    dn_spec.json) with mlx-lm's logits. The values differ by design: mx.quantize moves each group's grid so that
    one edge is exactly scale * round(edge / scale), dn keeps the min/max grid (both edges on it, so a weight
    already on a Q4_1-style grid keeps it); mlx-lm's loader uses whatever scales and biases are stored."""
    mlx_lm = pytest.importorskip("mlx_lm")
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import save_config, save_model

    from dn.runtime import backend as backends

    src = _source(tmp_path, model_type, default_model_dir)
    convert(src, tmp_path / "q", None, None, q)
    ref_model, ref_config = _mlx_lm_quantized(src, q)
    ours = mx.load(str(tmp_path / "q" / "model.safetensors"))
    ref = dict(tree_flatten(ref_model.parameters()))
    assert sorted(ours) == sorted(ref)
    for name, a in ref.items():  # dn's scales and biases of a bf16 weight: float16 (quant.side_dtype)
        side = name.endswith((".scales", ".biases")) and a.dtype == mx.bfloat16
        assert (ours[name].dtype, ours[name].shape) == (mx.float16 if side else a.dtype, a.shape), name
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"] == ref_config["quantization"]

    # at float32: at bf16 on a CPU mlx's kernel sums in bf16 and dn_mlx.quant in float32 (tests/test_bf16_quant.py)
    mlx = backends.get("mlx")
    ours_logits = mlx.logits(mlx.load(tmp_path / "q", load_spec(tmp_path / "q"), "float32"), TOKENS)
    theirs = mlx_lm.load(str(tmp_path / "q"))[0]
    theirs.set_dtype(mx.float32)
    np.testing.assert_array_equal(_logits(theirs, TOKENS), ours_logits)
    save_model(tmp_path / "mlx", ref_model)
    save_config(ref_config, tmp_path / "mlx" / "config.json")
    spec = load_spec(tmp_path / "mlx")
    assert spec.quant == ref_config["quantization"]
    ref_model.set_dtype(mx.float32)
    np.testing.assert_array_equal(mlx.logits(mlx.load(tmp_path / "mlx", spec, "float32"), TOKENS),
                                  _logits(ref_model, TOKENS))


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """(dense tiny llama, its dn convert -q folder: 4-bit groups of 32, 8-bit embedding)."""
    root = tmp_path_factory.mktemp("quant")
    src = tiny_model(root / "dense", "llama")
    convert(src, root / "q", None, None, quantization(4, 32, 8, 64))
    return src, root / "q"


def _dequantized_copy(q_dir, out):
    """q_dir with every quantized weight replaced by its float32 dequantization: the dense model the quantized
    one computes."""
    spec = load_spec(q_dir)
    mods = quant.layout(spec.quant, [t.name for t in spec.tensors])
    stored = tensors.load(q_dir / "model.safetensors")
    stored = {k: tensors.to_float32(v, dt) if dt in tensors.FLOATS else v for k, (v, dt) in stored.items()}
    dense = {}
    for name, a in stored.items():
        path, _, kind = name.rpartition(".")
        q = mods.get(path)
        if q and kind == "weight":
            s, b = (stored[f"{path}.{k}"] for k in ("scales", "biases"))
            dense[name] = quant.dequantize(a, s, b, q["bits"], q["group_size"])
        elif not (q and kind in ("scales", "biases")):
            dense[name] = a
    out.mkdir()
    tensors.save(dense, out / "model.safetensors")
    shutil.copy2(q_dir / "config.json", out / "config.json")
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if not k.startswith("quantization")}))
    return out


def test_quantized_folder_runs_its_dequantized_weights(backend, quantized, tmp_path):
    """On each backend, the quantized folder computes what the dense folder of its dequantized weights does,
    and rows() reads dense rows of a quantized module."""
    _, q_dir = quantized
    bq = _backend_quant(backend.NAME)
    spec = load_spec(q_dir)
    dense_dir = _dequantized_copy(q_dir, tmp_path / "deq")
    model = backend.load(q_dir, spec, "float32")
    out = backend.logits(model, TOKENS)[0]
    ref = backend.logits(backend.load(dense_dir, load_spec(dense_dir), "float32"), TOKENS)[0]
    err = np.abs(out - ref).max(-1) / np.abs(ref).max(-1)
    assert err.max() < QUANT["float32"]
    idx = np.array([5, 0, 17])
    dense = {k: v for k, (v, _) in tensors.load(dense_dir / "model.safetensors").items()}
    for path, module in ((EMBEDDING, model.model.embed_tokens), ("model.layers.1.mlp.down_proj",
                                                                  model.model.layers[1].mlp.down_proj)):
        np.testing.assert_allclose(np.array(bq.rows(module, idx)), dense[f"{path}.weight"][idx], err_msg=path,
                                   rtol=KERNEL["float32"].rtol, atol=KERNEL["float32"].atol)


def test_footprint_of_a_quantized_folder(quantized):
    """Dense bytes are the source's; resident bytes are what MLX holds for the folder, byte for byte."""
    pytest.importorskip("mlx_lm")
    from mlx.utils import tree_flatten

    from dn.footprint import accounted
    from dn.runtime import backend as backends

    src, q_dir = quantized
    spec = load_spec(q_dir)
    acc = accounted(spec, "float32", 64)
    assert acc["roles"] == accounted(load_spec(src), "float32", 64)["roles"]
    model = backends.get("mlx").load(q_dir, spec, "float32")
    assert acc["resident_weight_bytes"] == sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    assert acc["resident_weight_bytes"] < acc["dense_weight_bytes"] / 4


@pytest.mark.parametrize(("args", "needle"), [
    (["-q", "--codec", "lossless"], "lossless coding of quantized weights"),
    (["-q", "--q-bits", "5"], "unsupported quantization bits 5"),
    (["-q", "--q-embedding-group-size", "48"], "unsupported quantization group size 48"),
    (["--q-bits", "8"], "need -q"),
])
def test_convert_refuses_bad_quantization(tmp_path, args, needle):
    proc = dn("convert", "--out", str(tmp_path / "never"), *args)
    assert proc.returncode == 2
    assert_one_line_error(proc, needle)
    assert not (tmp_path / "never").exists()


def test_corrupt_quantized_folder_is_one_line(quantized, tmp_path):
    _, q_dir = quantized
    bad = tmp_path / "bad"
    shutil.copytree(q_dir, bad)
    stored = tensors.load(bad / "model.safetensors", mmap=False)
    name = "model.layers.0.mlp.up_proj.weight"
    packed, dtype = stored[name]
    stored[name] = (packed[:, :-1], dtype)
    tensors.save(stored, bad / "model.safetensors")
    assert_one_line_error(dn("footprint", "--no-measure", "--model", str(bad)), f"tensor {name} has shape")
    spec = json.loads((bad / SPEC_FILE).read_text())
    (bad / SPEC_FILE).write_text(json.dumps(spec | {"quant": spec["quant"] | {"group_size": 48}}))
    with pytest.raises(DnError, match="group size 48"):
        load_spec(bad)


def test_mlx_lm_folder_with_unsupported_quantization(quantized, tmp_path):
    """An already-quantized Hugging Face folder (no dn_spec.json) with parameters dn does not run: one line."""
    _, q_dir = quantized
    folder = tmp_path / "hf"
    shutil.copytree(q_dir, folder)
    (folder / SPEC_FILE).unlink()
    cfg = json.loads((folder / "config.json").read_text())
    assert load_spec(folder).quant == cfg["quantization"]
    for q, needle in (({"group_size": 64, "bits": 4, "mode": "nvfp4"}, "mode 'nvfp4'"),
                      ({"bits": 4, "quant_method": "awq"}, "method 'awq'")):
        (folder / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "quantization"}
                                                       | {"quantization_config": q}))
        with pytest.raises(DnError, match=needle):
            load_spec(folder)
