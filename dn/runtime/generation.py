"""The generation loop every verb shares (generate, chat, evaluate's residency line, parity, bench) and the Python
API: prompt -> ids, prefill then decode one token at a time, text streamed as it comes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from dn.core.errors import DnError
from dn.model.tokenizer import StreamDecoder
from dn.runtime import memory
from dn.runtime.sampling import sample

# Prompt tokens per forward (mlx-lm's prefill step): a long prompt's activations stay a step's. Not less: on torch a
# step after the first attends through a mask, off its fused causal path (4000 tokens: 1.5x slower in 512s).
PREFILL_STEP = 2048


def check_cache(kv_bits: int | None, max_kv_size: int | None) -> None:
    if kv_bits is not None and max_kv_size is not None:
        raise DnError("--kv-bits and --max-kv-size do not combine (no quantized rotating cache)")


def generate_tokens(backend, model, prompt_ids: list[int], max_tokens: int, temp: float = 0.0,
                    seed: int = 0, eos_ids: set[int] = frozenset(), *, top_p: float = 1.0, min_p: float = 0.0,
                    top_k: int = 0, max_kv_size: int | None = None, kv_bits: int | None = None,
                    cache=None, rng: np.random.Generator | None = None) -> Iterator[int]:
    """Prefill the prompt into a cache (a fresh one from the backend unless given; under max_kv_size N tokens
    at a time), then decode one token at a time. The last token yielded is not fed to the cache. The prompt goes in
    PREFILL_STEP tokens at a time (as llama.cpp's batches, mlx-lm's prefill steps), each asking for the logits of
    its last position only: a prompt's activations are a step's, and its [T, vocab] logits are never made
    (benchmarks/bench_generation_memory.py)."""
    if not prompt_ids:
        raise DnError("the prompt is empty")
    rng = np.random.default_rng(seed) if rng is None else rng
    if cache is None:
        cache = backend.make_cache(model, max_kv_size=max_kv_size, kv_bits=kv_bits)
    step = min(max_kv_size or PREFILL_STEP, PREFILL_STEP)
    for i in range(0, len(prompt_ids), step):
        logits = backend.logits(model, np.array([prompt_ids[i:i + step]]), cache, last_only=True)[0, -1]
    for i in range(max_tokens):
        token = sample(logits, temp, rng, top_p, min_p, top_k)
        yield token
        if token in eos_ids or i == max_tokens - 1:
            return
        logits = backend.logits(model, np.array([[token]]), cache, last_only=True)[0, -1]


def messages(prompt: str, system_prompt: str | None) -> list[dict]:
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
        [{"role": "user", "content": prompt}]


def prompt_ids(tokenizer, prompt: str, raw: bool, system_prompt: str | None = None) -> list[int]:
    if raw or not tokenizer.chat_template:
        if system_prompt:
            raise DnError("--system-prompt needs a chat template (" +
                          ("--raw turns it off)" if raw else "this model has none)"))
        return tokenizer.encode(prompt)
    text = tokenizer.apply_chat_template(messages(prompt, system_prompt))
    return tokenizer.encode(text, add_special_tokens=False)


@dataclass
class GenerationResponse:
    """One generated token, as mlx-lm's GenerationResponse: its text (the new piece; empty for an end-of-sequence
    token or an incomplete UTF-8 sequence), the token, and the speeds so far."""
    text: str
    token: int
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB, as mlx-lm (dn.runtime.memory.peak_bytes); on the last token only, 0.0 before
    finish_reason: str | None = None  # "stop" (end of sequence) or "length" on the last token, else None


def stream_generate(run, ids: list[int], max_tokens: int, temp: float = 0.0, seed: int = 0,
                    **kwargs) -> Iterator[GenerationResponse]:
    """generate_tokens over a loaded model (dn.runtime.loader.Loaded), as text pieces; kwargs go to
    generate_tokens. Under a residency budget its counters restart at the first token: reads per decode step,
    not the prompt's."""
    decoder, eos, start, first = StreamDecoder(run.tokenizer), run.tokenizer.eos_ids, time.perf_counter(), None
    tokens = generate_tokens(run.backend, run.model, ids, max_tokens, temp, seed, eos, **kwargs)
    for n, token in enumerate(tokens, 1):
        now = time.perf_counter()
        first = first or now
        if n == 1 and run.residency is not None:
            run.residency.reset_counters()
        stop = token in eos
        finish = "stop" if stop else "length" if n == max_tokens else None
        # the peak is read once, on the last token, not every step (on CPU it reads /proc)
        yield GenerationResponse("" if stop else decoder.add(token), token, len(ids), len(ids) / (first - start),
                                 n, (n - 1) / (now - first) if n > 1 else 0.0,
                                 memory.peak_bytes(run.backend) / 1e9 if finish else 0.0, finish)


def residency_line(runtime, measured: dict) -> str:
    """What a run under --max-resident held and read, on one line."""
    mib = lambda n: f"{n / 2**20:.1f} MiB"
    st = runtime.stats()
    return (f"[residency {runtime.plan.mode}] budget {mib(runtime.plan.budget)}; resident while generating: "
            f"peak {mib(measured['resident_peak_bytes'])}, median {mib(measured['resident_median_bytes'])} "
            f"({measured['resident_kind']}); read {mib(st['fetched_bytes_per_token'])} per token, "
            f"hit rate {100 * st['hit_rate']:.0f}%")
