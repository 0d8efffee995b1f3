"""dn.bench.peers: llama-bench's and llama-perplexity's output read right, a child's max RSS measured, one line when
the build cannot happen; the real llama.cpp on the default model when its build is in the cache."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_one_line_error

from dn.bench import peers
from dn.core.errors import DnError

ROOT = Path(__file__).resolve().parent.parent
EVAL_SMALL = ROOT / "tests" / "data" / "eval-small.txt"

# What llama-bench -o json prints for -p 128 -n 32 -r 2 (fields not read here left out).
BENCH_JSON = json.dumps([
    {"build_commit": "abc1234", "build_number": 7000, "cpu_info": "x86", "model_type": "llama 135M Q4_1",
     "model_size": 98000000, "model_n_params": 134515008, "n_prompt": 128, "n_gen": 0, "n_threads": 1,
     "avg_ts": 500.0, "samples_ns": [256000000, 256000000], "samples_ts": [400.0, 600.0]},
    {"build_commit": "abc1234", "build_number": 7000, "cpu_info": "x86", "model_type": "llama 135M Q4_1",
     "model_size": 98000000, "model_n_params": 134515008, "n_prompt": 0, "n_gen": 32, "n_threads": 1,
     "avg_ts": 90.0, "samples_ns": [400000000, 320000000], "samples_ts": [80.0, 100.0]},
])


def test_parse_bench_splits_decode_and_prefill():
    res = peers.parse_bench(BENCH_JSON)
    assert res["decode"] == {"tokens": 32, "samples_ts": [80.0, 100.0]}
    assert res["prefill"]["tokens"] == 128 and res["build"]["build_commit"] == "abc1234"
    s = peers.speed(res["decode"], "decode")
    assert s["tokens_per_s"] == 90.0 and s["decode_reps"] == 2 and s["decode_tokens"] == 32
    # per-token latency: p50 between the two repetitions' 10 ms and 12.5 ms, p99 near the slower one
    assert 10.0 < s["latency_ms_p50"] < 12.5 and 12.4 < s["latency_ms_p99"] <= 12.5
    pre = peers.speed(res["prefill"], "prefill")
    assert pre["prefill_tokens_per_s"] == 500.0 and pre["prefill_tokens"] == 128
    assert pre["prefill_ms_p50"] == pytest.approx((2.5 + 1e3 / 600) / 2)  # over the repetitions' ms a token


def test_parse_bench_not_json_is_one_error():
    with pytest.raises(DnError, match="no JSON"):
        peers.parse_bench("| model | size |")


def test_parse_perplexity():
    log = ("perplexity: calculating perplexity over 7 chunks, n_ctx=512, batch_size=512, n_seq=1\n"
           "[1]12.3,[2]13.4\nFinal estimate: PPL = 13.4567 +/- 0.45678\n")
    assert peers.parse_perplexity(log) == {"ppl": 13.4567, "ppl_stderr": 0.45678, "ppl_windows": 7}
    with pytest.raises(DnError, match="tokenizing failed"):
        peers.parse_perplexity("main: tokenizing failed\n")


@pytest.mark.parametrize("gnu_time", [True, False], ids=["gnu-time", "python-launcher"])
def test_max_rss_sees_the_childs_allocation_not_the_parents(gnu_time, monkeypatch):
    if gnu_time and not peers._gnu_time():
        pytest.skip("no GNU time here")
    monkeypatch.setattr(peers, "_gnu_time", lambda: gnu_time)
    held = bytearray(200 << 20)  # the parent's RSS must not show in the child's figure (it would if it forked it)
    small, _, _, _ = peers.max_rss([sys.executable, "-c", "pass"])
    big, out, _, _ = peers.max_rss([sys.executable, "-c", "b = bytearray(50 << 20); print(len(b))"])
    assert out.strip() == str(50 << 20) and len(held) == 200 << 20
    assert small < 60 << 20
    assert big - small >= 45 << 20 and big < small + (80 << 20)


def test_best_is_the_smallest_peak_then_the_fastest():
    recs = [{"config": "default", "process_peak_bytes": 170, "tokens_per_s": 80.0},
            {"config": "none", "process_peak_bytes": 101, "tokens_per_s": 95.0},
            {"config": "mmap", "process_peak_bytes": 100, "tokens_per_s": 70.0}]
    assert peers.best(recs)["config"] == "none"  # 1% more memory, within noise, and faster
    recs[1]["process_peak_bytes"] = 110
    assert peers.best(recs)["config"] == "mmap"


def test_max_rss_failure_is_one_line():
    with pytest.raises(DnError, match=r"exit 3\): boom"):
        peers.max_rss([sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"])


def test_no_cmake_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("DN_CACHE", str(tmp_path))  # no cached build here
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DnError, match="needs cmake and a C compiler"):
        peers.build_llama_cpp()
    env = os.environ | {"DN_CACHE": str(tmp_path), "PATH": str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_llama_cpp.py")], capture_output=True,
                          text=True, env=env)
    assert_one_line_error(proc, "needs cmake")


def test_llama_cpp_missing_file_is_one_error(tmp_path):
    with pytest.raises(DnError, match="no such file"):
        peers.llama_cpp(tmp_path / "none.gguf", EVAL_SMALL, bin_dir=tmp_path)


@pytest.mark.skipif(not peers.built(peers.llama_cpp_dir()),
                    reason="llama.cpp not built (python scripts/build_llama_cpp.py)")
def test_real_llama_cpp_on_default_model():
    from dn.model.sources import default_gguf

    gguf = default_gguf()
    recs = peers.llama_cpp(gguf, EVAL_SMALL, ctx=128, threads=1, decode_tokens=4, prefill_tokens=16, reps=2,
                           modes=peers.LLAMA_MODES[1:2], ppl_chunks=2)
    (r,) = recs
    assert r["backend"] == "llama.cpp" and r["config"] == "load-none" and "-lm" in r["command"]
    assert r["tokens_per_s"] > 1 and r["prefill_tokens_per_s"] > 1
    # the file read into memory: the peak holds every weight, the binary alone far less
    assert r["process_peak_bytes"] > 0.8 * gguf.stat().st_size > r["framework_baseline_bytes"]
    assert r["ppl_windows"] == 2 and 1 < r["ppl"] < 1000 and math.isfinite(r["ppl_stderr"])
    assert r["ppl_scoring"] == "second-half" and r["eval_tokens"] == 2 * 63 and r["dtype"] == "Q4_1"
