"""`dn generate`: stream text from a model; the chat template is applied for instruct models."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import numpy as np

from dn import cli


def setup_arg_parser():
    p = cli.ArgumentParser(prog="dn generate", description="Stream text from a model.")
    cli.add_model_args(p)
    p.add_argument("--prompt", default="Hello, who are you?")
    p.add_argument("--max-tokens", type=cli.positive_int, default=128)
    p.add_argument("--temp", type=cli.non_negative_float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    return p


def sample(logits: np.ndarray, temp: float, rng: np.random.Generator) -> int:
    """logits [V] -> token id; temp 0 is greedy."""
    if temp == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temp
    p = np.exp(z - z.max())
    return int(rng.choice(len(p), p=p / p.sum()))


def generate_tokens(backend, model, prompt_ids: list[int], max_tokens: int, temp: float = 0.0,
                    seed: int = 0, eos_ids: set[int] = frozenset()) -> Iterator[int]:
    """Prefill the prompt into a cache, then decode one token at a time."""
    rng = np.random.default_rng(seed)
    cache = backend.make_cache(model)
    logits = backend.logits(model, np.array([prompt_ids]), cache, last_only=True)[0, -1]
    for _ in range(max_tokens):
        token = sample(logits, temp, rng)
        yield token
        if token in eos_ids:
            return
        logits = backend.logits(model, np.array([[token]]), cache, last_only=True)[0, -1]


def prompt_ids(tokenizer, prompt: str, raw: bool) -> list[int]:
    if raw or not tokenizer.chat_template:
        return tokenizer.encode(prompt)
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    return tokenizer.encode(text, add_special_tokens=False)


def _main(argv) -> int:
    from dn import loader, memory
    from dn.tokenizer import StreamDecoder

    args = setup_arg_parser().parse_args(argv)
    run = loader.load(args.model, args.backend, args.dtype)
    ids = prompt_ids(run.tokenizer, args.prompt, args.raw)
    stream, n, start = StreamDecoder(run.tokenizer), 0, time.perf_counter()
    first = None
    for token in generate_tokens(run.backend, run.model, ids, args.max_tokens, args.temp, args.seed,
                                 run.tokenizer.eos_ids):
        first = first or time.perf_counter()
        n += 1
        if token not in run.tokenizer.eos_ids:
            print(stream.add(token), end="", flush=True)
    end = time.perf_counter()
    print()
    decode_rate = (n - 1) / (end - first) if n > 1 else 0.0
    print(f"[{run.backend.NAME} {run.backend.device_name()} {args.dtype}] prompt {len(ids)} tokens "
          f"{len(ids) / (first - start):.1f} tok/s; generated {n} tokens {decode_rate:.1f} tok/s; "
          f"peak memory {memory.peak_bytes(run.backend) / 2**20:.0f} MiB", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return cli.run(_main, argv)
