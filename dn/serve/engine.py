"""The model side of `dn serve`: one worker thread owns the model; requests wait in a FIFO queue and the ones
admitted (up to max_active) are decoded in turns, one token each, so no stream waits for another to end. Each
request has its own KV cache: not batched. A finished request leaves its cache in a prompt cache (capped in bytes,
least recently used first out) that the next request starting with the same tokens (a chat's earlier turns) extends
instead of prefilling them again. Generation is dn.runtime.generation.stream_generate, as `dn generate`."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from dn.runtime import memory, residency
from dn.runtime.generation import stream_generate

SHUTDOWN = {"status": 503, "code": "shutting_down", "message": "the server is shutting down"}


def failed(e: Exception) -> dict:
    return {"status": 500, "code": "generation_failed", "message": f"{type(e).__name__}: {e}"}


@dataclass
class Params:
    max_tokens: int
    temp: float
    top_p: float
    min_p: float
    top_k: int
    seed: int
    stop: list[str] = field(default_factory=list)


@dataclass
class Job:
    """One request: its prompt ids and parameters; emit(kind, value) is called on the worker thread with
    ("text", str), then ("done", usage dict) or ("error", {status, code, message})."""
    ids: list[int]
    params: Params
    emit: Callable[[str, object], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


def cache_bytes(cache) -> int:
    """The bytes a backend's KV cache holds: mlx-lm's cache layers say so (nbytes, allocated capacity included);
    transformers' layers hold keys and values tensors."""
    total = 0
    for layer in getattr(cache, "layers", cache):
        if hasattr(type(layer), "nbytes"):  # mlx-lm
            with contextlib.suppress(NotImplementedError):
                total += int(layer.nbytes)
            continue
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            total += int(getattr(t, "nbytes", 0) or 0)
    return total


class PromptCache:
    """KV caches of finished requests by the tokens they hold, capped in bytes; the least recently used go first.
    take() hands a cache out (it is no longer shared), put() gives one back."""

    def __init__(self, cap_bytes: int):
        self.cap, self.bytes = cap_bytes, 0
        self.entries: OrderedDict[tuple, tuple[object, int]] = OrderedDict()
        self.hits = self.misses = self.reused_tokens = self.evicted = 0
        self.lock = threading.Lock()

    def take(self, ids: list[int]) -> tuple[object, int]:
        """The cache of the longest stored token list that is a strict prefix of ids (a cache is only extended,
        which holds for every kind of cache, rotating ones too) and its length, or (None, 0)."""
        with self.lock:
            best = max((k for k in self.entries if len(k) < len(ids) and tuple(ids[:len(k)]) == k), key=len,
                       default=None)
            if best is None:
                self.misses += 1
                return None, 0
            cache, n = self.entries.pop(best)
            self.bytes -= n
            self.hits += 1
            self.reused_tokens += len(best)
            return cache, len(best)

    def put(self, tokens: list[int], cache, nbytes: int) -> None:
        with self.lock:
            key = tuple(tokens)
            if key in self.entries:
                self.bytes -= self.entries.pop(key)[1]
            if not key or nbytes > self.cap:
                return
            self.entries[key] = (cache, nbytes)
            self.bytes += nbytes
            while self.bytes > self.cap:
                _, (_, n) = self.entries.popitem(last=False)
                self.bytes -= n
                self.evicted += 1

    def stats(self) -> dict:
        with self.lock:
            return {"cap_bytes": self.cap, "bytes": self.bytes, "entries": len(self.entries), "hits": self.hits,
                    "misses": self.misses, "reused_tokens": self.reused_tokens, "evicted": self.evicted}


class StopMatcher:
    """Cuts streamed text at the first stop string, holding back a tail that could begin one."""

    def __init__(self, stops: list[str]):
        self.stops, self.held, self.stopped = [s for s in stops if s], "", False

    def feed(self, piece: str) -> str:
        text = self.held + piece
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.held, self.stopped = "", True
            return text[:cut]
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])),
                   default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


class _Live:
    """An admitted request being decoded: its generator, cache and what it has made so far."""

    def __init__(self, job: Job, gen, cache, reused: int):
        self.job, self.gen, self.cache, self.reused = job, gen, cache, reused
        self.tokens: list[int] = []
        self.stop = StopMatcher(job.params.stop)
        self.start = time.monotonic()


class Engine:
    """Owns the loaded model (dn.runtime.loader.Loaded) on one thread; submit() from any thread."""

    def __init__(self, run, max_active: int = 4, max_queue: int = 64, prompt_cache_bytes: int = 0,
                 max_kv_size: int | None = None, kv_bits: int | None = None):
        self.run, self.max_active, self.max_queue = run, max_active, max_queue
        self.max_kv_size, self.kv_bits = max_kv_size, kv_bits
        self.prompt_cache = PromptCache(prompt_cache_bytes)
        self.pending: queue.Queue[Job | None] = queue.Queue()
        self.active: list[_Live] = []
        self.lock = threading.Lock()
        self.admitted = 0  # submitted and not yet finished
        self.closed, self.deadline = False, None  # draining: admit nothing, end what runs at the deadline
        self.served = self.cancelled = self.failed = self.rejected = 0
        self.busy_s, self.generated = 0.0, 0  # time from admission to the end, for Retry-After
        self.thread = threading.Thread(target=self._loop, name="dn-serve-model", daemon=True)
        self.thread.start()

    # ---- any thread ---------------------------------------------------------------------------------------

    def submit(self, job: Job) -> bool:
        """Queue a job; False when the queue is full (or the engine is closing)."""
        with self.lock:
            if self.closed or self.admitted >= self.max_active + self.max_queue:
                self.rejected += 1
                return False
            self.admitted += 1
        self.pending.put(job)
        return True

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the mean request time so far times the queue's rounds."""
        with self.lock:
            done = self.served + self.cancelled + self.failed
            mean = self.busy_s / done if done else 1.0
            rounds = max(1, self.admitted - self.max_active + 1) / self.max_active
        return max(1, round(mean * rounds))

    def drain(self, seconds: float) -> None:
        """Admit no more; what is queued or running may finish within seconds, then it ends with an error."""
        with self.lock:
            self.closed, self.deadline = True, time.monotonic() + seconds

    def _late(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def close(self, timeout: float = 5.0) -> None:
        """Stop admitting, cancel what is queued or running, and wait for the worker (at most timeout s)."""
        with self.lock:
            self.closed = True
        for live in list(self.active):
            live.job.cancelled.set()
        while True:
            try:
                job = self.pending.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancelled.set()
                self._finish_job(job, "cancelled")
                job.emit("error", SHUTDOWN)
        self.pending.put(None)
        self.thread.join(timeout)

    def stats(self) -> dict:
        with self.lock:
            caches = [x.cache for x in self.active if x.cache is not None]
            out = {"active": len(self.active), "queued": self.admitted - len(self.active), "served": self.served,
                   "cancelled": self.cancelled, "failed": self.failed, "rejected": self.rejected,
                   "generated_tokens": self.generated, "max_active": self.max_active, "max_queue": self.max_queue}
        snap = memory.snapshot()
        out["memory"] = {"rss_bytes": snap["rss"], "peak_rss_bytes": memory.peak(), "kind": snap["kind"],
                         "load": self.run.memory, "kv_bytes_active": sum(map(cache_bytes, caches))}
        out["prompt_cache"] = self.prompt_cache.stats()
        out["residency"] = residency.fields(self.run.residency)  # the weights' budget, None without one
        return out

    # ---- the worker thread ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            while len(self.active) < self.max_active:
                try:  # waits only when nothing runs; past a drain's deadline, wakes to end what is queued
                    job = self.pending.get(block=not self.active, timeout=0.1 if self.deadline else None)
                except queue.Empty:
                    break
                if job is None:
                    for live in list(self.active):
                        self._end(live, "cancelled")
                        live.job.emit("error", SHUTDOWN)  # as _step: a waiting stream or request gets its end
                    return
                self._admit(job)
            for live in list(self.active):
                self._step(live)

    def _admit(self, job: Job) -> None:
        if job.cancelled.is_set() or self._late():
            self._finish_job(job, "cancelled")
            job.emit("error", SHUTDOWN)
            return
        cache, reused = self.prompt_cache.take(job.ids) if self.prompt_cache.cap > 0 else (None, 0)
        try:
            if cache is None:
                cache = self.run.backend.make_cache(self.run.model, max_kv_size=self.max_kv_size,
                                                    kv_bits=self.kv_bits)
            p = job.params
            gen = stream_generate(self.run, job.ids[reused:], p.max_tokens, p.temp, p.seed, top_p=p.top_p,
                                  min_p=p.min_p, top_k=p.top_k, max_kv_size=self.max_kv_size, kv_bits=self.kv_bits,
                                  cache=cache)
        except Exception as e:  # a backend's refusal (DnError) or a failure: this request only
            self._finish_job(job, "failed")
            job.emit("error", failed(e))
            return
        with self.lock:
            self.active.append(_Live(job, gen, cache, reused))

    def _step(self, live: _Live) -> None:
        if live.job.cancelled.is_set() or self._late():
            self._end(live, "cancelled")  # a client gone: its cache is dropped, not kept
            live.job.emit("error", SHUTDOWN)
            return
        try:
            r = next(live.gen)
        except Exception as e:  # StopIteration cannot come first: the last response carries a finish_reason
            self._end(live, "failed")
            live.job.emit("error", failed(e))
            return
        live.tokens.append(r.token)
        text = live.stop.feed(r.text)
        finish = "stop" if live.stop.stopped else r.finish_reason
        if finish and not live.stop.stopped:
            text += live.stop.flush()
        if text:
            live.job.emit("text", text)
        if finish:
            # what the cache holds: the prompt and every token but the last (never fed)
            self.prompt_cache.put(live.job.ids + live.tokens[:-1], live.cache, cache_bytes(live.cache))
            self._end(live, "served")
            live.job.emit("done", {"finish_reason": finish, "prompt_tokens": len(live.job.ids),
                                   "completion_tokens": len(live.tokens), "cached_tokens": live.reused})

    def _end(self, live: _Live, how: str) -> None:
        live.gen.close()
        with self.lock:
            self.active.remove(live)
            self.generated += len(live.tokens)
        live.cache = None
        self._finish_job(live.job, how, time.monotonic() - live.start)

    def _finish_job(self, job: Job, how: str, busy_s: float = 0.0) -> None:
        with self.lock:
            self.admitted -= 1
            setattr(self, how, getattr(self, how) + 1)
            self.busy_s += busy_s
