import json
import math

import numpy as np
from helpers import run_dn

from dn.evaluate import perplexity, windows


def test_windows_do_not_overlap_and_drop_single_tokens():
    w = windows(list(range(11)), 5)
    assert [x.tolist() for x in w] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert len(windows(list(range(12)), 5)) == 3


def test_perplexity_batches_agree(backend, loaded, tokenizer, eval_text):
    tokens = tokenizer.encode(eval_text.read_text())[:100]
    one, n1 = perplexity(backend, loaded, tokens, 24, batch=1)
    four, n4 = perplexity(backend, loaded, tokens, 24, batch=4)
    assert n1 == n4 == 100 - math.ceil(100 / 24)
    assert abs(one - four) < 1e-4


def test_eval_cli_json(tmp_path, eval_text, backend_name):
    out = tmp_path / "e.json"
    proc = run_dn("eval", "--backend", backend_name, "--text", str(eval_text), "--max-tokens", "128",
                  "--ctx", "64", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert set(r) == {"model", "backend", "device", "dtype", "tokens", "ppl", "nll", "resident_weight_bytes",
                      "dense_weight_bytes", "measured_resident_bytes", "measured_kind", "load_peak_bytes",
                      "load_peak_kind", "rss_bytes", "anon_bytes", "file_bytes", "pss_bytes", "rss_kind",
                      "rss_peak_bytes", "rss_peak_kind", "peak_memory_bytes", "resident_peak_bytes",
                      "resident_median_bytes", "resident_p99_bytes", "resident_samples", "resident_kind",
                      "max_resident_bytes", "fetched_bytes_per_token", "hit_rate", "residency_mode"}
    assert r["max_resident_bytes"] is None and r["resident_samples"] == 2  # no budget; one sample per window
    assert r["resident_weight_bytes"] == r["dense_weight_bytes"] == 538060032  # accounted, dense default model
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
