"""`dn bench --peers`: dn scored as llama-perplexity scores (second half of each window, against a hand computation),
llama.cpp's records in dn bench's shape (through stand-in binaries), one line and a record when a peer cannot run,
the peer table; on the real llama.cpp build, when it is in the cache, dn and llama.cpp scoring the same text alike."""

import importlib.util
import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_one_line_error
from test_bench import tiny_model
from test_peers import BENCH_JSON

from dn.bench import peers, report, runner
from dn.model.sources import default_gguf
from dn.runtime import loader

ROOT = Path(__file__).resolve().parent.parent
EVAL_SMALL = ROOT / "tests" / "data" / "eval-small.txt"
V = 5
LOGITS = np.random.default_rng(1).standard_normal((V, V))  # a bigram model: next-token logits by current token


class Bigram:
    """A backend whose model predicts token t+1 from token t alone, through LOGITS."""

    @staticmethod
    def token_nll(model, tokens):
        x = LOGITS[tokens[:, :-1]]
        logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
        return -np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]


def _hand_nll(prev: int, nxt: int) -> float:
    row = [float(v) for v in LOGITS[prev]]
    return math.log(sum(math.exp(v) for v in row)) - row[nxt]


@pytest.mark.parametrize("bos", [None, 4])
def test_second_half_scoring_against_a_hand_computation(bos):
    tokens = [1, 2, 3, 0, 1, 3, 2, 2, 0, 1, 3, 3, 1]  # 13 tokens, ctx 6: two windows, the last token left out
    ctx = 6
    wins = runner.llama_windows(tokens, ctx, bos)
    assert wins.tolist() == [[bos if bos is not None else 1, 2, 3, 0, 1, 3],
                             [bos if bos is not None else 2, 2, 0, 1, 3, 3]]
    nll, count = runner.second_half_perplexity(Bigram, None, tokens, ctx, bos)
    # llama-perplexity: first = ctx // 2 = 3; logits at positions 3..4 predict tokens 4..5 of each window
    hand = [_hand_nll(w[k], w[k + 1]) for w in wins.tolist() for k in (3, 4)]
    assert count == 2 * (ctx - 1 - ctx // 2) == len(hand)
    assert nll == pytest.approx(sum(hand) / len(hand), rel=1e-12)
    every = [_hand_nll(w[k], w[k + 1]) for w in wins.tolist() for k in range(ctx - 1)]
    assert nll != pytest.approx(sum(every) / len(every))  # the first half is left out


def test_too_short_for_a_window_is_one_error():
    with pytest.raises(runner.DnError, match="fewer than one window of --ctx 8"):
        runner.llama_windows([1, 2, 3], 8, None)


def _stand_in_bin(folder: Path) -> Path:
    """llama-bench and llama-perplexity stand-ins: what the real ones print, for -p 128 -n 32 -r 2."""
    folder.mkdir(parents=True, exist_ok=True)
    scripts = {"llama-bench": f"import sys\nif '--help' not in sys.argv:\n    print({BENCH_JSON!r})\n",
               "llama-perplexity": "import sys\nprint('perplexity: calculating perplexity over 2 chunks, n_ctx=128',"
                                   " file=sys.stderr)\nprint('Final estimate: PPL = 12.5000 +/- 0.30000',"
                                   " file=sys.stderr)\n"}
    for name, body in scripts.items():
        path = folder / name
        path.write_text(f"#!{sys.executable}\n{body}")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return folder


def test_llama_cpp_records_have_dn_benchs_shape(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    plan = {"gguf": gguf, "bin_dir": _stand_in_bin(tmp_path / "bin")}
    recs = peers.run("llama.cpp", plan, EVAL_SMALL, ctx=128, threads=1, decode_tokens=32, prefill_tokens=128,
                     reps=2, max_tokens=256)
    assert [r["config"] for r in recs] == [m for m, _ in peers.LLAMA_MODES]
    assert sum(r["best_memory_mode"] for r in recs) == 1
    for r in recs:
        assert r["backend"] == "llama.cpp" and r["batch"] == 1 and r["dtype"] == "Q4_1"
        assert r["tokens_per_s"] == 90.0 and 10 < r["latency_ms_p50"] <= r["latency_ms_p99"] <= 12.5
        assert r["prefill_tokens_per_s"] == 500.0 and r["decode_reps"] == 2
        assert r["process_peak_bytes"] > 0 and r["framework_baseline_bytes"] > 0
        assert r["ppl"] == 12.5 and r["ppl_scoring"] == "second-half" and r["eval_tokens"] == 2 * 63
        assert "--chunks" in r["ppl_command"] and r["ppl_command"][r["ppl_command"].index("--chunks") + 1] == "2"
    md = report.peer_table(recs)
    assert md.count("\n") == 2 + len(recs) and "(best memory)" in md and "second-half (126)" in md
    assert "| {90.0} |" in report.peer_table(recs, braces=True)
    report.peer_plot(recs, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_no_compiler_skips_llama_cpp_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("DN_CACHE", str(tmp_path))  # no cached build
    monkeypatch.setenv("PATH", str(tmp_path))  # no cmake, no compiler
    plans = peers.prepare(["llama.cpp", "mlx-lm"], None, tmp_path / "nowhere")
    assert "needs cmake and a C compiler" in plans["llama.cpp"]["skipped"]
    assert plans["mlx-lm"]["skipped"].startswith("no mlx-lm folder of the same weights")
    (rec,) = peers.run("llama.cpp", plans["llama.cpp"], EVAL_SMALL, 128, 1, 4, 16, 2, 256)
    assert rec == {"backend": "llama.cpp", "config": "skipped", "batch": 1, "skipped": plans["llama.cpp"]["skipped"]}
    assert "skipped: building llama.cpp needs" in report.peer_table([rec])


def test_dn_bench_with_peers_on_a_tiny_model(tmp_path):
    """A model that is not a GGUF: llama.cpp is skipped in one line (recorded), mlx-lm on an unreadable folder too;
    dn's records carry the peer fields and are scored as llama-perplexity scores; --skip dense runs no dense."""
    model = tiny_model(tmp_path)
    out = tmp_path / "b.json"
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "dn.cli", "bench", "--model", str(model), "--text",
                           str(tmp_path / "eval.txt"), "--configs", "native", "--backends", "torch", "--dtypes",
                           "float32", "--max-tokens", "256", "--ctx", "64", "--decode-tokens", "2",
                           "--prefill-tokens", "8", "--prefill-reps", "1", "--skip", "agreement,dense",
                           "--threads", "1", "--cache", str(tmp_path / "cache"), "--peers", "llama.cpp,mlx-lm",
                           "--mlx-lm-folder",
                           str(tmp_path / "none"), "--json", str(out)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if "skipped" in ln]
    assert len(lines) == 2 and "llama.cpp skipped: " in lines[0] and ".gguf" in lines[0]
    assert "Traceback" not in proc.stderr
    result = json.loads(out.read_text())
    assert result["peers"] == ["llama.cpp", "mlx-lm"] and result["ppl_scoring"] == "second-half"
    native, llama, mlx = result["records"]
    assert native["config"] == "native" and native["ppl_scoring"] == "second-half"
    assert native["eval_tokens"] == 4 * (64 - 1 - 32) and native["greedy_agreement"] is None  # no dense to agree with
    assert native["framework_baseline_bytes"] > 50 << 20  # python, numpy and torch at least
    assert native["process_peak_bytes"] >= native["framework_baseline_bytes"] + native["measured_resident_bytes"]
    assert (llama["backend"], llama["config"]) == ("llama.cpp", "skipped") and "skipped" in mlx
    assert "| llama.cpp | skipped | skipped:" in proc.stdout


def test_skip_dense_alone_is_one_line(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("some text")
    proc = subprocess.run([sys.executable, "-m", "dn.cli", "bench", "--text", str(text), "--configs", "dense",
                           "--skip", "dense", "--backends", "torch", "--json", str(tmp_path / "o.json")],
                          capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert_one_line_error(proc, "--skip dense leaves no config to run")


@pytest.mark.skipif(importlib.util.find_spec("mlx_lm") is None, reason="mlx-lm is not installed")
def test_mlx_lm_record_scored_as_dn_scores(tmp_path):
    """mlx-lm on a folder (the tiny model): dn bench's record shape, and its second-half perplexity equal to dn's
    on the same weights and text (bf16 weights; mlx-lm computes at bf16, dn here at float32)."""
    model = tiny_model(tmp_path)
    (r,) = peers.mlx_lm(model, tmp_path / "eval.txt", threads=1, prompt_tokens=8, decode_tokens=4, ctx=64,
                        ppl_windows=2, weights="the tiny model")
    assert r["backend"] == "mlx-lm" and r["mlx_lm_folder"] == str(model) and r["decode_reps"] == 3
    assert r["tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0 and r["latency_ms_p50"] <= r["latency_ms_p99"]
    assert r["process_peak_bytes"] > r["framework_baseline_bytes"] > 50 << 20
    assert r["ppl_scoring"] == "second-half" and r["eval_tokens"] == 2 * (64 - 1 - 32)
    run = loader.load(model, "torch", "float32")
    tokens = run.tokenizer.encode((tmp_path / "eval.txt").read_text())[:2 * 64]
    nll, count = runner.second_half_perplexity(run.backend, run.model, tokens, 64, run.tokenizer.bos_id)
    assert count == r["eval_tokens"] and math.exp(nll) == pytest.approx(r["ppl"], rel=0.01)  # every token: +6%


@pytest.mark.skipif(not peers.built(peers.llama_cpp_dir()),
                    reason="llama.cpp not built in the dn cache (python scripts/build_llama_cpp.py, a few minutes)")
def test_dn_and_llama_cpp_score_the_same_tokens_alike():
    """The same GGUF, text, ctx and windows: llama-perplexity and dn's second-half scoring agree (dn's native
    path on the Q4_1 blocks at bf16: within 0.8% here), and dn's own scoring of every token does not (+43%)."""
    (rec,) = peers.llama_cpp(default_gguf(), EVAL_SMALL, ctx=128, threads=1, decode_tokens=4, prefill_tokens=16,
                             reps=1, modes=peers.LLAMA_MODES[:1], ppl_chunks=2)
    run = loader.load(None, "torch", "bfloat16")
    tokens = run.tokenizer.encode(EVAL_SMALL.read_text())[:2 * 128]
    nll, count = runner.second_half_perplexity(run.backend, run.model, tokens, 128, run.tokenizer.bos_id)
    assert count == rec["eval_tokens"] == 2 * 63
    assert math.exp(nll) == pytest.approx(rec["ppl"], rel=0.02)
    every, _ = runner.perplexity(run.backend, run.model, tokens, 128, bos=run.tokenizer.bos_id)
    assert abs(math.exp(every) / rec["ppl"] - 1) > 0.1
