"""A native GGUF folder on MLX (dn_mlx/gguf.py): tiny llamas of random blocks of each type, then the default model.

The exact types are held as mlx's quantized modules whose values are the blocks' own (bit for bit at float32), the
others (Q2_K, Q3_K, Q6_K) as the file's blocks, decoded at use by mlx ops bit for bit as gguf_blocks.decode, holding
exactly the blocks' bytes; logits equal the numpy reference's on the decoded weights."""

import json

import numpy as np
import pytest

from dn.core import tensors
from dn.core.tolerances import PARITY, QUANT
from dn.formats import gguf_blocks as gb
from dn.model import reference
from dn.model.spec import Architecture, load_spec, tensor_shapes

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
nn = pytest.importorskip("mlx.nn")
from mlx.utils import tree_flatten  # noqa: E402

from dn.runtime import backend as backends  # noqa: E402
from dn.runtime.pipeline import Stage  # noqa: E402
from dn_mlx import gguf  # noqa: E402

H, INTER, LAYERS, HEADS, KV, HD, VOCAB = 256, 512, 2, 4, 2, 64, 256  # rows of whole 256-weight k-quant blocks
FP16_AT = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82),
           "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}  # byte offsets of d (and dmin / m)
# d's size per type so that weights are about 0.1 (codes * sub-block scales span 16 to 4000 steps of d)
D = {"Q4_0": 6e-3, "Q4_1": 6e-3, "Q5_0": 3e-3, "Q5_1": 3e-3, "Q8_0": 1e-3, "Q2_K": 3e-3, "Q3_K": 1e-3,
     "Q4_K": 2e-4, "Q5_K": 1e-4, "Q6_K": 3e-5}


def random_blocks(kind, shape, rng):
    """Random blocks of dense shape [rows, cols]: random codes and sub-block scales, d (and dmin) of D's size."""
    _, bw, bb = gb.TYPES[kind]
    raw = rng.integers(0, 256, (shape[0] * shape[1] // bw, bb), dtype=np.uint8)
    for at in FP16_AT[kind]:
        raw[:, at:at + 2] = (rng.uniform(-1, 1, len(raw)) * D[kind]).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(shape[0], -1)


def tiny_gguf(path, types: dict, tied: bool, seed: int = 0):
    """A native GGUF folder (config.json with gguf_quantization, each quantized weight its uint8 blocks) of a tiny
    llama; types: module path -> block type, the rest F32. Returns (folder, decoded float32 weights)."""
    rng = np.random.default_rng(seed)
    cfg = {"model_type": "llama", "hidden_size": H, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
           "num_attention_heads": HEADS, "num_key_value_heads": KV, "head_dim": HD, "vocab_size": VOCAB,
           "rms_norm_eps": 1e-6, "max_position_embeddings": 128, "tie_word_embeddings": tied,
           "rope_theta": 10000.0}
    shapes = tensor_shapes(Architecture.from_hf_config(cfg), norms=True)
    stored, dense = {}, {}
    for name, shape in shapes.items():
        kind = types.get(name.removesuffix(".weight"))
        if kind:
            stored[name] = random_blocks(kind, shape, rng)
            dense[name] = gb.decode(kind, stored[name])
        else:
            base = 1.0 if "norm" in name else 0.0
            stored[name] = dense[name] = (base + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    path.mkdir()
    tensors.save(stored, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({**cfg, "gguf_quantization": types}))
    return path, dense


def forward(w: dict, a: Architecture, ids: np.ndarray) -> np.ndarray:
    """The numpy reference over the whole model (dn.model.reference's layers): logits [L, vocab]."""
    h = w["model.embed_tokens.weight"][ids]
    for i in range(a.num_hidden_layers):
        p = f"model.layers.{i}."
        h = reference.decoder_layer(h, {k[len(p):]: v for k, v in w.items() if k.startswith(p)}, a, i)
    h = reference.rms_norm(h, w["model.norm.weight"], a.rms_norm_eps)
    return h @ w["lm_head.weight" if "lm_head.weight" in w else "model.embed_tokens.weight"].T


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def _held(model, path):
    mod = model
    for part in path.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    return mod


CASES = {kind: {p.removesuffix(".weight"): kind for p in tensor_shapes(Architecture.from_hf_config(
    {"model_type": "llama", "hidden_size": H, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
     "num_attention_heads": HEADS, "vocab_size": VOCAB, "tie_word_embeddings": False}))} for kind in gb.TYPES}
# a Q4_K_M-like mix: each kind somewhere, one projection left F32, the head of its own type
CASES["mixed"] = {**{p: list(gb.TYPES)[i % len(gb.TYPES)] for i, p in enumerate(CASES["Q4_K"])},
                  "lm_head": "Q6_K"}
del CASES["mixed"]["model.layers.1.mlp.up_proj"]


def _case(tmp_path, case):
    tied = case in ("Q4_0", "Q5_1", "Q2_K", "Q4_K", "Q6_K")  # the embedding is also the head
    types = {p: t for p, t in CASES[case].items() if not (tied and p == "lm_head")}
    folder, dense = tiny_gguf(tmp_path / case, types, tied)
    return folder, load_spec(folder), types, dense


IDS = np.random.default_rng(1).integers(0, VOCAB, size=(1, 12))


def _stored(folder, path):
    with tensors.File(folder / "model.safetensors") as f:
        return f.read(path + ".weight")


@pytest.mark.parametrize("kind", gguf.BLOCKS)
def test_blocks_decode_on_mlx(kind):
    """The MLX decode of wholly random blocks (any float16 d, NaN and inf among them) is gguf_blocks.decode's, bit
    for bit; rows decodes the rows asked for; the chunked matmul is x @ W.T."""
    rng = np.random.default_rng(2)
    bb = gb.TYPES[kind][2]
    raw = rng.integers(0, 256, (96, 3 * bb), dtype=np.uint8)
    for i, bits in enumerate((0x7C00, 0xFC00, 0x0001, 0x8000)):  # d = inf, -inf, the least subnormal, -0
        raw[0, i % 3 * bb + FP16_AT[kind][0]:][:2] = np.array([bits], "<u2").view(np.uint8)
    with np.errstate(invalid="ignore"):
        want = gb.decode(kind, raw)
    assert np.isnan(want).any() and np.isinf(want).any()  # the special values are exercised
    np.testing.assert_array_equal(np.array(gguf.decode(kind, mx.array(raw))), want)
    mod = gguf.BlocksEmbedding(nn.Embedding(96, 768), kind, mx.float32, False)
    mod.weight = mx.array(raw)
    ids = np.array([[5, 0, 95, 5]])
    np.testing.assert_array_equal(np.array(mod(mx.array(ids))), want[ids])
    mod.weight = mx.array(random_blocks(kind, (96, 768), rng))  # finite d
    x = rng.standard_normal((2, 768)).astype(np.float32)
    want = x @ gb.decode(kind, np.array(mod.weight)).T
    assert _rel(np.array(mod.as_linear(mx.array(x))), want) <= PARITY["float32"].max_rel_err


def test_blocks_matmul_decodes_a_chunk_at_a_time(monkeypatch):
    """A 2048 x 4096 Q6_K matmul (32 MB decoded at float32) in chunks of 1 MB holds about one chunk's floats at a
    time: its peak above what lived before stays under 4 chunks (all chunks at once, as a lazy graph would, 52 MB)."""
    monkeypatch.setattr(gguf, "CHUNK", 1 << 18)
    rng = np.random.default_rng(3)
    mod = gguf.BlocksLinear(nn.Linear(4096, 2048, bias=False), "Q6_K", mx.float32, False)
    mod.weight = mx.array(random_blocks("Q6_K", (2048, 4096), rng))
    x = mx.array(rng.standard_normal((1, 1, 4096)).astype(np.float32))
    mx.eval(mod.weight, x, mod(x))
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    mx.eval(mod(x))
    assert mx.get_peak_memory() - before < 4 * gguf.CHUNK * 4 < 2048 * 4096 * 4 / 2


@pytest.mark.parametrize("case", list(CASES))
def test_random_blocks_on_mlx(tmp_path, monkeypatch, case):
    """float32: every module holds the blocks' values bit for bit; the logits are the numpy reference's (the block
    types' matmuls in chunks of 64 rows of 512, concatenated)."""
    monkeypatch.setattr(gguf, "CHUNK", 1 << 15)
    folder, spec, types, dense = _case(tmp_path, case)
    be = backends.get("mlx")
    model = be.load(folder, spec, "float32")
    for path, kind in types.items():  # exact types held quantized with the blocks' values, the rest decoded
        mod = _held(model, path)
        if kind in gb.AFFINE:
            assert isinstance(mod, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and mod.group_size == gb.GROUP
            assert mod.scales.dtype in (mx.float16, mx.float32)
            got = np.array(mx.dequantize(mod.weight, mod.scales.astype(mx.float32), mod.biases.astype(mx.float32),
                                         group_size=mod.group_size, bits=mod.bits))
        else:
            assert type(mod) in (gguf.BlocksLinear, gguf.BlocksEmbedding) and mod.weight.dtype == mx.uint8
            np.testing.assert_array_equal(np.array(mod.weight), _stored(folder, path))
            got = np.array(mod.rows())
        np.testing.assert_array_equal(got, dense[path + ".weight"], err_msg=path)
    want = forward(dense, spec.architecture, IDS[0])
    assert _rel(be.logits(model, IDS)[0], want) <= PARITY["float32"].max_rel_err


@pytest.mark.parametrize("case", ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K", "mixed"])
def test_random_blocks_on_mlx_bf16(tmp_path, case):
    """bfloat16: off the reference by no more than a dense bf16 folder of the same decoded weights is (issue 20
    item 4: a quantized model at bf16 as good as the dense one); the block types still held as their blocks."""
    folder, spec, types, dense = _case(tmp_path, case)
    plain = tmp_path / "dense"
    plain.mkdir()
    tensors.save(dense, plain / "model.safetensors")
    cfg = json.loads((folder / "config.json").read_text())
    (plain / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "gguf_quantization"}))
    be = backends.get("mlx")
    model = be.load(folder, spec, "bfloat16")
    assert all(_held(model, p).weight.dtype == mx.uint8 for p, t in types.items() if t not in gb.AFFINE)
    want = forward(dense, spec.architecture, IDS[0])
    floor = _rel(be.logits(be.load(plain, load_spec(plain), "bfloat16"), IDS)[0], want)
    assert _rel(be.logits(model, IDS)[0], want) <= 2 * floor  # before the bf16 fix: 4-16 times


@pytest.mark.parametrize("case", [*gguf.BLOCKS, "mixed"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_blocks_hold_the_files_bytes(tmp_path, case, dtype):
    """The block types' modules hold exactly their blocks' bytes (mx arrays' nbytes), at any compute dtype; a model
    of only block types at float32 holds exactly what its file stores. Held dense at float32 they would be 4.9x
    (Q6_K) to 12x (Q2_K)."""
    folder, spec, types, _ = _case(tmp_path, case)
    model = backends.get("mlx").load(folder, spec, dtype)
    blocks = [p for p, t in types.items() if t in gguf.BLOCKS]
    held = sum(a.nbytes for p in blocks for _, a in tree_flatten(_held(model, p).parameters()))
    shapes = tensor_shapes(spec.architecture)
    assert held == sum(gb.GGUFBlocks.nbytes(shapes[p + ".weight"], 4, types[p]) for p in blocks)
    assert held == sum(_stored(folder, p).nbytes for p in blocks)
    if case != "mixed" and dtype == "float32":
        with tensors.File(folder / "model.safetensors") as f:
            stored = sum(f.read(n).nbytes for n in f.header)
        assert sum(a.nbytes for _, a in tree_flatten(model.parameters())) == stored


def test_default_model_native_folder_on_mlx(tmp_path):
    """The default model's native folder (Q4_1, its embedding Q8_0) at float32: the logits of a dense float32 folder
    of the same decoded values; the widening (those values rounded to bf16) within bf16 noise, its greedy tokens."""
    from dn.model.sources import resolve_model

    native = resolve_model(None, progress=False)
    spec = load_spec(native)
    decoded = tmp_path / "decoded"
    decoded.mkdir()
    with tensors.File(native / "model.safetensors") as f:
        tensors.save({n: gb.decode(spec.gguf[n[:-7]], f.read(n)) if n[:-7] in spec.gguf else f.read(n, "float32")
                      for n in f.header}, decoded / "model.safetensors")
    cfg = json.loads((native / "config.json").read_text())
    del cfg["gguf_quantization"]
    (decoded / "config.json").write_text(json.dumps(cfg))
    be = backends.get("mlx")
    ids = np.array([[1, 504, 3458, 282, 4649, 314, 7042, 30, 2]])
    got = be.logits(be.load(native, spec, "float32"), ids)[0]
    want = be.logits(be.load(decoded, load_spec(decoded), "float32"), ids)[0]
    assert _rel(got, want) <= PARITY["float32"].max_rel_err
    widened = resolve_model(None, progress=False, dense=True)
    wide = be.logits(be.load(widened, load_spec(widened), "float32"), ids)[0]
    assert (got.argmax(-1) == wide.argmax(-1)).all() and _rel(got, wide) <= QUANT["bfloat16"]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_first_rank_maps_its_embedding(tmp_path, case, dtype):
    """A first pipeline rank's embedding stays in the file (dn_mlx.gguf.MappedEmbedding: no parameters in MLX's
    allocator) and looks rows up bit for bit as the loaded table does, signed zeros and bf16-held scales included
    (before: the symmetric types' -0 came out +0, Q4_K/Q5_K at bf16 off by the table's rounded scales)."""
    folder, spec, _, _ = _case(tmp_path, case)
    be = backends.get("mlx")
    full, part = be.load(folder, spec, dtype), be.load(folder, spec, dtype, stage=Stage(0, 2))
    emb = part.model.embed_tokens
    assert isinstance(emb, gguf.MappedEmbedding) and not tree_flatten(emb.parameters())
    want, got = full.model.embed_tokens(mx.array(IDS)), emb(mx.array(IDS))
    assert got.dtype == want.dtype and got.shape == want.shape
    f32 = lambda a: np.array(a.astype(mx.float32)).view(np.uint32)
    np.testing.assert_array_equal(f32(got), f32(want))
