"""dn serve under load on loopback: N concurrent streaming chat clients for D seconds, each holding conversations of
up to --turns turns (so the prompt cache is used), against a server started here.

    python benchmarks/bench_serve.py [--clients 16] [--duration 60] [--max-tokens 64] [--json OUT] [-- SERVE FLAGS]

Records requests served and errors (any status but 200, an error event, a stream without [DONE], a client
exception), time to first token p50/p99 (request sent -> first content), tokens/s in aggregate (completion tokens
over the wall time) and per request (p50 of each stream's tokens over its time after the first token), the
server's memory: its RSS once loaded and idle, its peak resident bytes (VmHWM, reset by the loader when the weights
load, so load + serving), the weights' measured load, and a bare process importing the same frameworks (the floor
under any model); then the server is stopped with SIGTERM and its exit code recorded. JSON through
dn.runtime.timing.report. `nox -s serve_load` runs it; docs/serve.md quotes docs/results/serve-load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dn.runtime import memory, timing  # noqa: E402

TOPICS = ["the sea", "a mountain", "bread", "the moon", "a city at night", "rain", "a library", "trains", "bees",
          "winter", "a river", "music", "a garden", "the desert", "clocks", "a lighthouse"]
FOLLOW_UPS = ["Say more.", "Now make it shorter.", "Give it a title."]
BASELINE = ("import resource, torch, transformers, starlette, uvicorn, dn.serve; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_kib(pid: int) -> dict:
    return memory.parse_kib(Path(f"/proc/{pid}/status").read_text())


async def _request(http: httpx.AsyncClient, url: str, messages: list[dict], max_tokens: int, seed: int) -> dict:
    body = {"model": "default", "messages": messages, "max_tokens": max_tokens, "temperature": 0.7, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}}
    start, first, text, usage, done, error = time.perf_counter(), None, [], None, False, None
    try:
        async with http.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"]["message"]
                    break
                if event.get("usage"):
                    usage = event["usage"]
                for c in event.get("choices", []):
                    if c["delta"].get("content"):
                        first = first or time.perf_counter()
                        text.append(c["delta"]["content"])
    except Exception as e:  # a refused or broken connection: an error of the run, not of the benchmark
        return {"error": f"{type(e).__name__}: {e}"}
    end = time.perf_counter()
    if error or not done or usage is None:
        return {"error": error or "stream ended without [DONE] and usage"}
    n = usage["completion_tokens"]
    return {"ttft_s": (first or end) - start, "total_s": end - start, "tokens": n, "text": "".join(text),
            "cached": usage["prompt_tokens_details"]["cached_tokens"], "prompt_tokens": usage["prompt_tokens"],
            "tps": (n - 1) / (end - first) if first and n > 1 and end > first else None}


async def _client(i: int, url: str, deadline: float, args, out: list, key: str | None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(timeout=600, headers=headers) as http:
        k = 0
        while time.perf_counter() < deadline:
            messages = [{"role": "user", "content": f"Write two sentences about {TOPICS[(i + k) % len(TOPICS)]}."}]
            for turn in range(args.turns):
                if time.perf_counter() >= deadline:
                    break
                r = await _request(http, url, messages, args.max_tokens, seed=1000 * i + k)
                r.update(client=i, turn=turn)
                out.append(r)
                if "error" in r:
                    break
                messages += [{"role": "assistant", "content": r.pop("text")},
                             {"role": "user", "content": FOLLOW_UPS[turn % len(FOLLOW_UPS)]}]
                k += 1
            k += 1


def _pct(xs, q):
    return float(np.percentile(xs, q)) if xs else None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    serve_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration", type=float, default=60.0, help="seconds during which clients start requests")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--turns", type=int, default=3, help="turns of each conversation")
    p.add_argument("--json", default=str(ROOT / "out" / "bench" / "serve-load.json"))
    p.add_argument("--append", action="store_true", help="add this run's record to those --json holds")
    args = p.parse_args(own)

    port = _free_port()
    cmd = [sys.executable, "-m", "dn.cli", "serve", "--port", str(port), "-q", *serve_flags]
    key = serve_flags[serve_flags.index("--api-key") + 1] if "--api-key" in serve_flags else None
    log = tempfile.TemporaryFile()  # noqa: SIM115 (the server's output, shown if it fails)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        for _ in range(1200):  # 10 minutes at most for the load (a conversion on first use included)
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None:
                log.seek(0)
                raise SystemExit(f"dn serve exited with {proc.returncode}: {log.read()[-2000:].decode()}")
            time.sleep(0.5)
        idle = httpx.get(base + "/dn/stats", headers=headers, timeout=30).json()
        out: list[dict] = []
        rss_max = 0

        async def run():
            nonlocal rss_max
            start = time.perf_counter()
            tasks = [asyncio.create_task(_client(i, base + "/v1/chat/completions", start + args.duration, args, out,
                                                 key)) for i in range(args.clients)]
            while not all(t.done() for t in tasks):
                rss_max = max(rss_max, _proc_kib(proc.pid).get("VmRSS", 0))
                await asyncio.sleep(0.2)
            await asyncio.gather(*tasks)
            return time.perf_counter() - start

        wall = asyncio.run(run())
        end = httpx.get(base + "/dn/stats", headers=headers, timeout=30).json()
        status = _proc_kib(proc.pid)
        proc.send_signal(signal.SIGTERM)
        t = time.perf_counter()
        code = proc.wait(120)
        stop_s = time.perf_counter() - t
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    floor = int(subprocess.run([sys.executable, "-c", BASELINE], capture_output=True, text=True, check=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout)

    ok = [r for r in out if "error" not in r]
    errors = [r["error"] for r in out if "error" in r]
    tokens = sum(r["tokens"] for r in ok)
    record = {
        "clients": args.clients, "duration_s": args.duration, "max_tokens": args.max_tokens, "turns": args.turns,
        "wall_s": wall, "requests": len(out), "served": len(ok), "errors": len(errors), "error_samples": errors[:5],
        "ttft_p50_s": _pct([r["ttft_s"] for r in ok], 50), "ttft_p99_s": _pct([r["ttft_s"] for r in ok], 99),
        "request_s_p50": _pct([r["total_s"] for r in ok], 50), "completion_tokens": tokens,
        "tokens_per_s_aggregate": tokens / wall,
        "tokens_per_s_per_request_p50": _pct([r["tps"] for r in ok if r["tps"]], 50),
        "prompt_tokens": sum(r["prompt_tokens"] for r in ok), "cached_prompt_tokens": sum(r["cached"] for r in ok),
        "memory": {"idle_rss_bytes": idle["memory"]["rss_bytes"], "peak_rss_bytes": status.get("VmHWM"),
                   "peak_rss_kind": "VmHWM of the server (reset by the loader as the weights load)",
                   "max_rss_sampled_under_load_bytes": rss_max, "load": idle["memory"]["load"],
                   "framework_floor_rss_bytes": floor,
                   "framework_floor_kind": "max RSS of a process importing torch, transformers, starlette, "
                                           "uvicorn and dn.serve (no model)",
                   "prompt_cache_cap_bytes": end["prompt_cache"]["cap_bytes"], "residency": end.get("residency")},
        "server": {k: end[k] for k in ("served", "cancelled", "failed", "rejected", "generated_tokens", "max_active",
                                       "max_queue")} | {"prompt_cache": end["prompt_cache"]},
        "sigterm_exit_code": code, "sigterm_exit_s": stop_s, "serve_flags": " ".join(serve_flags),
        "serve_command": " ".join(["dn", *cmd[3:]]), "loadavg": os.getloadavg(),
    }
    command = ["python", "benchmarks/bench_serve.py", *argv]
    records = [record]
    if args.append and Path(args.json).is_file():
        records = json.loads(Path(args.json).read_text())["records"] + records
    timing.write(timing.report(records, command), args.json)
    print(json.dumps({k: v for k, v in record.items() if k not in ("memory", "server")}, indent=1))
    return 0 if not errors and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
