"""dn serve as a client sees it: the real `openai` package against a server started here on a free loopback port
(one per module where it can be shared, always killed), plus the prompt cache and stop matching on their own."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import openai
import pytest
from helpers import assert_one_line_error, run_dn

from dn.runtime.generation import prompt_ids
from dn.serve.engine import PromptCache, StopMatcher

KEY = "test-key"
PROMPT = "Write one sentence about the sea."
LONG = "Count from one to five hundred, one number per line: one, two, three,"  # a long reply, for streams held open


# ---- without a model ------------------------------------------------------------------------------------------

def test_prompt_cache_is_capped_in_bytes_least_recent_out_and_hands_out_the_longest_prefix():
    c = PromptCache(100)
    c.put([1, 2], "a", 40)
    c.put([1, 2, 3, 4], "b", 40)
    c.put([9], "big", 101)  # over the cap alone: not kept
    assert c.stats()["entries"] == 2 and c.bytes == 80
    assert c.take([1, 2, 3, 4]) == ("a", 2)  # a strict prefix only: the cache is extended, never cut
    assert c.take([1, 2, 3, 4, 5]) == ("b", 4)
    assert c.take([1, 2, 3]) == (None, 0) and c.bytes == 0
    for i in range(4):
        c.put([i], i, 30)
    assert c.bytes == 90 and [k[0] for k in c.entries] == [1, 2, 3] and c.evicted == 1


def test_stop_strings_cut_the_text_and_hold_back_what_may_begin_one():
    m = StopMatcher(["END", "\n\n"])
    out = [m.feed(p) for p in ["Hello E", "N", "D world"]]
    assert out == ["Hello ", "", ""] and m.stopped
    m = StopMatcher(["END"])
    assert m.feed("an E") == "an " and m.feed("ar") == "Ear" and m.flush() == "" and not m.stopped


def test_serve_binds_loopback_by_default_and_warns_for_another_host(tmp_path):
    from dn.serve import setup_arg_parser

    assert setup_arg_parser().parse_args([]).host == "127.0.0.1"
    proc = run_dn("serve", "--host", "0.0.0.0", "--port", "0", "--model", str(tmp_path / "none"),
                  timeout=120)
    assert proc.returncode == 2 and "no authentication" in proc.stderr.splitlines()[0]
    assert "Traceback" not in proc.stderr


# ---- a server ----------------------------------------------------------------------------------------------------

class Served:
    """dn serve on port 0 (the port it picks is read from its first line), ready once /health answers."""

    def __init__(self, *flags, backend="torch", wait_s=180):
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (open for the server's life, closed in stop)
        self.proc = subprocess.Popen([sys.executable, "-m", "dn.cli", "serve", "--port", "0", "--backend", backend,
                                      "-q", *flags], stdout=self.log, stderr=subprocess.STDOUT)
        deadline, self.base = time.monotonic() + wait_s, None
        while True:
            if self.base is None and (m := re.search(r"on (http://127\.0\.0\.1:(\d+))/v1", self.output())):
                self.base, self.port = m[1], int(m[2])
            try:
                if self.base and httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                out = self.output()
                self.stop()
                pytest.fail(f"dn serve did not start: {out[-3000:]}")
            time.sleep(0.3)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.log.close()

    def client(self, key=KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0, timeout=120)

    def post(self, path: str, content=None, auth=True, timeout=120, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {KEY}"} if auth else {}
        return httpx.post(self.base + path, content=content, headers=headers, timeout=timeout, **kw)

    def stats(self) -> dict:
        return httpx.get(self.base + "/dn/stats", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()

    def wait_idle(self, timeout=30) -> dict:
        deadline = time.monotonic() + timeout
        while (s := self.stats())["active"] or s["queued"]:
            assert time.monotonic() < deadline, s
            time.sleep(0.1)
        return s


@pytest.fixture(scope="module")
def server():
    # float32: a prefix taken from the prompt cache then gives the very tokens of a fresh prefill (in bfloat16 the
    # two orders of summation can pick another greedy token)
    s = Served("--api-key", KEY, "--max-active", "2", "--max-queue", "1", "--prompt-cache-bytes", "64MiB",
               "--dtype", "float32")
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def mlx_server():
    pytest.importorskip("mlx.core")
    s = Served("--api-key", KEY, backend="mlx")
    try:
        yield s
    finally:
        s.stop()


def _chat(client, content=PROMPT, **kw):
    return client.chat.completions.create(model="default", messages=[{"role": "user", "content": content}], **kw)


def assert_serving(s: Served):
    """The server still answers a request after a failure."""
    r = _chat(s.client(), max_tokens=2, temperature=0)
    assert r.usage.completion_tokens >= 1


@pytest.mark.slow
@pytest.mark.parametrize("backend_name", ["torch", "mlx"])
def test_chat_plain_and_streamed_give_dn_generates_greedy_tokens(backend_name, request, tokenizer):
    s = request.getfixturevalue("server" if backend_name == "torch" else "mlx_server")
    n = 16 if backend_name == "torch" else 8  # MLX on a CPU is slow
    want = run_dn("generate", "--backend", backend_name, "--dtype", "float32", "--prompt", PROMPT, "-m", str(n),
                  "--temp", "0", "-q")
    assert want.returncode == 0, want.stderr
    client = s.client()
    r = _chat(client, max_tokens=n, temperature=0)
    assert r.choices[0].message.content == want.stdout.removesuffix("\n")
    assert r.usage.prompt_tokens == len(prompt_ids(tokenizer, PROMPT, False))
    assert r.usage.completion_tokens == n or r.choices[0].finish_reason == "stop"
    chunks = list(_chat(client, max_tokens=n, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [m.id for m in client.models.list().data] == [r.model]


@pytest.mark.slow
def test_completions_plain_and_streamed_stop_at_a_stop_string(server):
    client = server.client()
    full = client.completions.create(model="default", prompt=LONG, max_tokens=12, temperature=0)
    text = full.choices[0].text
    stop = text.split()[3]  # a word from the middle of the greedy text
    want = text[:text.find(stop)]
    r = client.completions.create(model="default", prompt=LONG, max_tokens=12, temperature=0, stop=[stop])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
    assert r.usage.completion_tokens < full.usage.completion_tokens
    chunks = list(client.completions.create(model="default", prompt=LONG, max_tokens=12, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want and chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_a_chats_earlier_turns_come_from_the_prompt_cache_with_the_same_tokens(server):
    client = server.client()
    first = _chat(client, max_tokens=12, temperature=0)
    turns = [{"role": "user", "content": PROMPT},
             {"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "And one about the sky."}]
    again = [client.chat.completions.create(model="default", messages=turns, max_tokens=8, temperature=0)
             for _ in range(2)]
    assert again[0].usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens  # the first turn reused
    assert again[1].usage.prompt_tokens_details.cached_tokens == 0  # its cache was handed out: prefilled afresh
    assert again[0].choices[0].message.content == again[1].choices[0].message.content
    cache = server.stats()["prompt_cache"]
    assert 0 < cache["bytes"] <= cache["cap_bytes"] == 64 * 2**20


@pytest.mark.slow
def test_concurrent_streams_are_served_in_turns(server):
    """Two streams admitted together: the second's first token comes before the first stream ends."""
    times = {}

    def stream(name):
        chunks = server.client().completions.create(model="default", prompt=LONG, max_tokens=40, temperature=0,
                                                    stream=True)
        for i, _ in enumerate(chunks):
            times.setdefault(name, [time.monotonic(), None])[1] = time.monotonic()
            if i == 0:
                times[name][0] = time.monotonic()

    threads = [threading.Thread(target=stream, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    (a_first, a_last), (b_first, b_last) = times["a"], times["b"]
    assert max(a_first, b_first) < min(a_last, b_last)


# ---- failures: each answers as a client expects, and the server serves the next request ----------------------

@pytest.mark.slow
@pytest.mark.parametrize("body, code", [
    (b"{not json", "invalid_json"),
    (b"[1, 2]", "invalid_json"),
    (json.dumps({"messages": "hi"}).encode(), "invalid_type"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}).encode(), "invalid_type"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}).encode(), "invalid_type"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": 1}).encode(), "invalid_type"),
    (json.dumps({"messages": []}).encode(), "empty_messages"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}).encode(),
     "max_tokens_too_large"),
])
def test_a_bad_request_is_a_400_with_a_one_line_json_error(server, body, code):
    r = server.post("/v1/chat/completions", body)
    assert r.status_code == 400 and r.json()["error"]["code"] == code
    assert r.text.count("\n") == 0 and set(r.json()["error"]) == {"message", "type", "code"}


@pytest.mark.slow
def test_a_prompt_over_the_context_is_refused_and_so_is_an_oversized_body(server):
    with pytest.raises(openai.BadRequestError, match="context"):
        server.client().completions.create(model="default", prompt=[1] * 9000, max_tokens=4)
    r = server.post("/v1/completions", b" " * (17 * 2**20))
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert_serving(server)


@pytest.mark.slow
def test_an_unknown_model_is_a_404_and_a_missing_key_a_401(server):
    with pytest.raises(openai.NotFoundError, match="gpt-4"):
        server.client().chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    r = server.post("/v1/chat/completions", b"{}", auth=False)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert_serving(server)


def _open_stream(s: Served, max_tokens=400, first=True):
    """A streamed request held open (after its first event, if first): (client, response, its lines)."""
    c = httpx.Client(timeout=120, headers={"Authorization": f"Bearer {KEY}"})
    r = c.send(c.build_request("POST", s.base + "/v1/completions", json={
        "prompt": LONG, "max_tokens": max_tokens, "stream": True}), stream=True)
    assert r.status_code == 200
    lines = r.iter_lines()
    if first:
        next(lines)
    return c, r, lines


@pytest.mark.slow
@pytest.mark.parametrize("stream", [True, False])
def test_a_client_leaving_mid_stream_cancels_its_generation_and_drops_its_cache(server, stream):
    before = server.wait_idle()
    if stream:
        c, r, _ = _open_stream(server)
        r.close()
        c.close()
    else:  # a plain request whose client gives up waiting after a second
        with pytest.raises(httpx.ReadTimeout):
            server.post("/v1/completions", json={"prompt": LONG, "max_tokens": 400},
                        timeout=httpx.Timeout(60, read=1.0))
    after = server.wait_idle()
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["generated_tokens"] - before["generated_tokens"] < 400  # stopped early
    assert after["prompt_cache"]["entries"] == before["prompt_cache"]["entries"]  # its cache was not kept
    assert_serving(server)


@pytest.mark.slow
def test_more_requests_than_the_queue_admits_get_429_with_retry_after(server):
    held = [_open_stream(server, first=i < 2) for i in range(3)]  # --max-active 2 + --max-queue 1: the third waits
    try:
        with pytest.raises(openai.RateLimitError) as e:
            _chat(server.client(), max_tokens=2)
        assert int(e.value.response.headers["retry-after"]) >= 1
        assert e.value.body["code"] == "queue_full"
    finally:
        for c, r, _ in held:
            r.close()
            c.close()
    server.wait_idle()
    assert_serving(server)


@pytest.mark.slow
def test_sigterm_ends_streams_within_the_shutdown_timeout_and_exits_0():
    s = Served("--shutdown-timeout", "2")
    try:
        c, _, rest = _open_stream(s, max_tokens=2000)
        start = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        lines = [line for line in rest if line]  # the stream ends: done or told why
        assert lines[-1] == "data: [DONE]" or json.loads(lines[-1][6:])["error"]["code"] == "shutting_down"
        assert s.proc.wait(30) == 0, s.output()[-3000:]
        assert time.monotonic() - start < 2 + 8
        c.close()
    finally:
        s.stop()


@pytest.mark.slow
def test_a_port_in_use_is_one_line(server):
    proc = run_dn("serve", "--port", str(server.port), timeout=120)
    assert_one_line_error(proc, "cannot listen")

