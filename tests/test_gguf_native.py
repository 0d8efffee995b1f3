"""The native GGUF folder (dn/model/gguf.py): every quantized tensor kept as the file's blocks, the same values as the
bf16 widening, the same bytes as the file; bad files give one line."""

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_one_line_error, run_dn

from dn.core import tensors
from dn.core.errors import DnError
from dn.formats import gguf_blocks
from dn.model import store
from dn.model.sources import default_gguf, resolve_model
from dn.model.spec import load_spec


@pytest.fixture(scope="module")
def native_dir():
    return resolve_model(None, progress=False)


def test_native_folder_is_the_files_bytes(native_dir):
    size = sum(f.stat().st_size for f in native_dir.iterdir())
    assert size <= 1.1 * default_gguf().stat().st_size  # issue 20: the cached folder <= 1.1x the GGUF
    spec = load_spec(native_dir)
    assert set(spec.gguf.values()) == {"Q4_1", "Q8_0"} and spec.gguf["model.embed_tokens"] == "Q8_0"
    held = store.resident_bytes(spec, "float32")
    stored = sum(t.numel for t in spec.tensors if t.dtype == "U8")
    assert held["gguf"] == stored and held["affine"] == held["lossless"] == 0
    assert held["dense"] == sum(t.numel * 4 for t in spec.tensors if t.dtype == "F32")  # the norms


def test_native_blocks_decode_to_the_widening(native_dir, default_model_dir):
    """Each tensor's blocks decode to the dense widening's values (bf16 there), q/k rows unpermuted alike."""
    spec = load_spec(native_dir)
    names = ["model.embed_tokens.weight", "model.layers.3.self_attn.q_proj.weight",
             "model.layers.3.self_attn.k_proj.weight", "model.layers.29.mlp.down_proj.weight",
             "model.layers.0.input_layernorm.weight"]
    native = tensors.load(native_dir / "model.safetensors", mmap=False, names=names)
    dense = tensors.load(default_model_dir / "model.safetensors", mmap=False, names=names)
    for name in names:
        arr, dt = native[name]
        kind = spec.gguf.get(name.removesuffix(".weight"))
        values = gguf_blocks.decode(kind, arr) if kind else tensors.to_float32(arr, dt)
        np.testing.assert_array_equal(tensors.f32_to_bf16(values), dense[name][0], err_msg=name)


def test_truncated_gguf_gives_one_line(tmp_path):
    cut = tmp_path / "cut.gguf"
    data = default_gguf().read_bytes()
    cut.write_bytes(data[:len(data) * 9 // 10])
    proc = run_dn("generate", "--model", str(cut), "--prompt", "hi", "--max-tokens", "1",
                  env={"DN_CACHE": str(tmp_path / "cache")})
    assert_one_line_error(proc, "cut.gguf")
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


def test_unsupported_block_type_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("DN_CACHE", str(tmp_path))
    monkeypatch.delitem(gguf_blocks.TYPES, "Q4_1")  # as if the file used a type dn does not read
    with pytest.raises(DnError, match=r"block type Q4_1, which dn does not read"):
        resolve_model(str(default_gguf()))


def test_unknown_type_in_a_folder_config_is_one_line(tmp_path, native_dir):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(native_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["gguf_quantization"]["model.embed_tokens"] = "IQ4_NL"
    (folder / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(run_dn("generate", "--model", str(folder), "--prompt", "hi", "--max-tokens", "1"), "IQ4_NL")


def _mapping_of(ptr: int) -> str | None:
    """The file a process address is mapped from (/proc/self/maps), None for anonymous memory."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= ptr < hi:
            return fields[5] if len(fields) > 5 else None
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps (Linux)")
@pytest.mark.parametrize("tied", [True, False])
def test_untied_embedding_is_mapped_not_read_on_torch(tmp_path, tied):
    """An untied embedding of a native folder stays in the file (a token reads one row): torch maps it; a tied one
    is the lm_head too, and is read."""
    pytest.importorskip("torch")
    from test_gguf_kernel import _gguf_folder

    from dn_torch import model as torch_model

    native, _ = _gguf_folder(tmp_path, tied)
    spec = load_spec(native)
    assert store.mapped(spec) == (set() if tied else {"model.embed_tokens.weight"})
    model = torch_model.load(native, spec, "float32")
    where = _mapping_of(model.get_input_embeddings().weight.data_ptr())
    assert (where == str(native / "model.safetensors")) is (not tied), where
    assert _mapping_of(model.model.layers[0].mlp.up_proj.weight.data_ptr()) != str(native / "model.safetensors")


TEXTS = ["In 2024, 12345 apples cost $3.50.\n\n  It's   what they'll say\r\nüber naïve 東京 2x", "a\tb  \n c's 7,000"]


def test_qwen2_text_splits_as_its_own_tokenizer():
    """A GGUF's tokenizer.ggml.pre names how its text is split before BPE: Qwen2's regex (digits one at a time, NFC)
    is transformers' Qwen2Converter's, not GPT-2's (which splits 12345 as one piece: 600 more tokens on the held-out
    news, and perplexity 20% off llama.cpp's on the same file)."""
    from transformers.convert_slow_tokenizer import Qwen2Converter

    from dn.model import gguf

    class Original:  # what the converter asks of a slow tokenizer
        add_prefix_space = False

    want = Qwen2Converter(Original).converted({"a": 0, "b": 1, "ab": 2}, [("a", "b")]).pre_tokenizer
    got = gguf.pre_tokenizer("qwen2")
    for text in TEXTS:
        assert got.pre_tokenize_str(text) == want.pre_tokenize_str(text)
    gpt2 = gguf.pre_tokenizer("gpt2").pre_tokenize_str(TEXTS[0])
    assert [p for p, _ in gpt2 if "12345" in p] and gpt2 != want.pre_tokenize_str(TEXTS[0])


def test_smollm_splits_digits_first():
    """SmolLM's tokenizer splits every digit before GPT-2's regex (its tokenizer.json: Digits, then ByteLevel)."""
    from tokenizers import pre_tokenizers

    from dn.model import gguf

    want = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    for text in TEXTS:
        assert gguf.pre_tokenizer("smollm").pre_tokenize_str(text) == want.pre_tokenize_str(text)
    assert not any(p.strip("Ġ").isdigit() and len(p.strip("Ġ")) > 1
                   for p, _ in gguf.pre_tokenizer("smollm").pre_tokenize_str(TEXTS[0]))
