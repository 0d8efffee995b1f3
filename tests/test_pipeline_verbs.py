"""chat, eval and serve under --pipeline (dn.runtime.pipeline) through the real launchers, two local ranks: torchrun
(gloo) for torch, mlx.launch (ring) for MLX; each gives what one process gives."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest
from test_pipeline import _descendants, _launcher_works

TIMEOUT = 300  # a loaded 2-core machine: bounded, not tight
TEXT = str(Path(__file__).parent / "data" / "eval-small.txt")
TURNS = "Hi\n/reset\nHello there\nWhat is 2+2?\n"  # a reset, then a turn whose cache the next one extends
PROMPT = "Write one sentence about the sea."


def _dn(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dn", *args], input=stdin, capture_output=True, text=True,
                          timeout=TIMEOUT)


def _ranks(stderr: str) -> list[int]:
    return sorted(int(r) for r in re.findall(r"^rank (\d+): layers", stderr, re.M))


def _one_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dn: error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_eval_gives_one_process_perplexity(backend_name, tmp_path):
    """rank 0 scores the pipeline's logits (Stages.token_nll): the NLL of one process to 1e-4 relative (float32:
    in bfloat16 torch's first rank, which maps the embedding it looks up, differs from one process in the last bits)."""
    if why := _launcher_works(backend_name):
        pytest.skip(why)
    n = "256" if backend_name == "torch" else "64"  # MLX on a CPU is slow
    common = ["eval", "--backend", backend_name, "--text", TEXT, "--ctx", "32", "--max-tokens", n,
              "--dtype", "float32"]
    one = _dn(*common, "--json", str(tmp_path / "one.json"))
    assert one.returncode == 0, one.stderr
    two = _dn(*common, "--json", str(tmp_path / "two.json"), "--pipeline", "2")
    assert two.returncode == 0, two.stderr
    a, b = (json.loads((tmp_path / f"{x}.json").read_text()) for x in ("one", "two"))
    assert a["tokens"] == b["tokens"] > 0
    assert abs(b["nll"] / a["nll"] - 1) < 1e-4, (a["nll"], b["nll"])
    assert _ranks(two.stderr) == [0, 1] and "ppl" in two.stdout


def test_chat_turns_and_reset_give_one_process_replies(backend_name):
    """Piped turns reach rank 0 (the local launcher hands them on); the other ranks make a new cache when rank 0
    does (/reset) and extend theirs across turns, so the greedy replies are one process's."""
    if why := _launcher_works(backend_name):
        pytest.skip(why)
    common = ["chat", "--backend", backend_name, "-m", "4" if backend_name == "torch" else "3"]
    one = _dn(*common, stdin=TURNS)
    assert one.returncode == 0, one.stderr
    two = _dn(*common, "--pipeline", "2", stdin=TURNS)
    assert two.returncode == 0, two.stderr
    assert two.stdout == one.stdout and len(one.stdout.splitlines()) == 3
    assert "conversation reset" in two.stderr and _ranks(two.stderr) == [0, 1]
    forwards = re.search(r"^rank 1: .*?; (\d+) forwards", two.stderr, re.M)
    assert forwards and int(forwards[1]) >= 3, two.stderr


def test_bad_combinations_are_one_line():
    for flag in (["--max-active", "2"], ["--prompt-cache-bytes", "1MiB"]):
        _one_error(_dn("serve", "--port", "0", "--pipeline", "2", *flag), "--pipeline")
    bad = _dn("chat", "--backend", "torch", "--pipeline", "2", "--pipeline-split", "29,2", stdin=TURNS)
    _one_error(bad, "--pipeline-split")


def _serve(*flags) -> tuple[subprocess.Popen, str, object]:
    log = tempfile.TemporaryFile()  # noqa: SIM115 (the server's log, closed by the test)
    proc = subprocess.Popen([sys.executable, "-m", "dn", "serve", "--port", "0", "-q", *flags], stdout=log,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        log.seek(0)
        if m := re.search(r"on (http://127\.0\.0\.1:\d+)/v1", log.read().decode(errors="replace")):
            try:
                if httpx.get(m[1] + "/health", timeout=2).status_code == 200:
                    return proc, m[1], log
            except httpx.TransportError:
                pass
        time.sleep(0.3)
    log.seek(0)
    proc.kill()
    pytest.fail(f"dn serve --pipeline did not start: {log.read().decode(errors='replace')[-3000:]}")


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the ranks through /proc")
def test_serve_answers_as_one_process_and_sigterm_ends_every_rank():
    """The real openai client against `dn serve --pipeline 2` on torch: greedy replies, plain and streamed, are
    `dn generate`'s, one request at a time each over a fresh cache (another prompt between two of the same);
    SIGTERM to the local launcher ends every rank."""
    n = 8
    want = _dn("generate", "--backend", "torch", "--prompt", PROMPT, "-m", str(n), "-q")
    assert want.returncode == 0, want.stderr
    proc, base, log = _serve("--backend", "torch", "--pipeline", "2")
    ranks = []
    try:
        ranks = _descendants(proc.pid)
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)
        ask = lambda content, **kw: client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": content}], max_tokens=n, temperature=0, **kw)
        first = ask(PROMPT).choices[0].message.content
        assert first == want.stdout.removesuffix("\n")
        ask("And one about the sky.")
        chunks = list(ask(PROMPT, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == first
        stats = httpx.get(base + "/dn/stats", timeout=30).json()
        assert stats["max_active"] == 1 and stats["prompt_cache"]["cap_bytes"] == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) != 0
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{p}").exists() and "Z" not in _state(p) for p in ranks):
            assert time.monotonic() < deadline, "a rank outlived the launcher"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.seek(0)
        out = log.read().decode(errors="replace")
        log.close()
    assert "one request at a time" in out and "Traceback" not in out, out[-3000:]


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
