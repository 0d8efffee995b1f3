"""`dn generate`: stream text from a model; the chat template is applied for instruct models."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import numpy as np

from dn import cli
from dn.runtime.sampling import sample

__all__ = ["add_generation_args", "generate_tokens", "prompt_ids", "sample"]


def add_generation_args(p) -> None:
    """The flags generate and chat share (named as in mlx-lm)."""
    cli.add_model_args(p)
    p.add_argument("--system-prompt", default=None, help="a system message before the conversation")
    p.add_argument("--max-tokens", "-m", type=cli.positive_int, default=128, help="tokens to generate (per reply)")
    p.add_argument("--temp", type=cli.non_negative_float, default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-p", type=cli.fraction, default=1.0,
                   help="sample from the smallest set of tokens whose probability reaches P (1 = off)")
    p.add_argument("--min-p", type=cli.fraction, default=0.0,
                   help="drop tokens less likely than P times the most likely one (0 = off)")
    p.add_argument("--top-k", type=cli.non_negative_int, default=0, help="sample from the K most likely (0 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-kv-size", type=cli.positive_int, default=None,
                   help="keep keys and values of at most N tokens (a rotating cache; a longer prompt is "
                        "prefilled N tokens at a time)")
    p.add_argument("--kv-bits", type=int, default=None, choices=[2, 3, 4, 5, 6, 8],
                   help="quantize the KV cache to this many bits, from the first token")
    p.add_argument("--verbose", nargs="?", const=True, default=True, type=_bool, metavar="BOOL",
                   help="print speed and memory statistics on stderr (--verbose false or -q: do not)")
    p.add_argument("-q", "--quiet", dest="verbose", action="store_false", help="same as --verbose false")
    from dn.runtime import residency

    residency.add_args(p)


def _bool(text: str) -> bool:
    import argparse

    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def setup_arg_parser():
    p = cli.ArgumentParser(prog="dn generate", description="Stream text from a model.")
    p.add_argument("--prompt", "-p", default="Hello, who are you?", help="the prompt; - reads it from stdin")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    add_generation_args(p)
    return p


def check_cache_args(args) -> None:
    from dn.core.errors import DnError

    if args.kv_bits is not None and args.max_kv_size is not None:
        raise DnError("--kv-bits and --max-kv-size do not combine (no quantized rotating cache)")


def generate_tokens(backend, model, prompt_ids: list[int], max_tokens: int, temp: float = 0.0,
                    seed: int = 0, eos_ids: set[int] = frozenset(), *, top_p: float = 1.0, min_p: float = 0.0,
                    top_k: int = 0, max_kv_size: int | None = None, kv_bits: int | None = None,
                    cache=None, rng: np.random.Generator | None = None) -> Iterator[int]:
    """Prefill the prompt into a cache (a fresh one from the backend unless given; under max_kv_size N tokens
    at a time), then decode one token at a time. The last token yielded is not fed to the cache."""
    from dn.core.errors import DnError

    if not prompt_ids:
        raise DnError("the prompt is empty")
    rng = np.random.default_rng(seed) if rng is None else rng
    if cache is None:
        cache = backend.make_cache(model, max_kv_size=max_kv_size, kv_bits=kv_bits)
    step = max_kv_size or len(prompt_ids)
    for i in range(0, len(prompt_ids), step):
        logits = backend.logits(model, np.array([prompt_ids[i:i + step]]), cache, last_only=True)[0, -1]
    for i in range(max_tokens):
        token = sample(logits, temp, rng, top_p, min_p, top_k)
        yield token
        if token in eos_ids or i == max_tokens - 1:
            return
        logits = backend.logits(model, np.array([[token]]), cache, last_only=True)[0, -1]


def sampling_kwargs(args) -> dict:
    return {"top_p": args.top_p, "min_p": args.min_p, "top_k": args.top_k}


def messages(prompt: str, system_prompt: str | None) -> list[dict]:
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
        [{"role": "user", "content": prompt}]


def prompt_ids(tokenizer, prompt: str, raw: bool, system_prompt: str | None = None) -> list[int]:
    from dn.core.errors import DnError

    if raw or not tokenizer.chat_template:
        if system_prompt:
            raise DnError("--system-prompt needs a chat template (" +
                          ("--raw turns it off)" if raw else "this model has none)"))
        return tokenizer.encode(prompt)
    text = tokenizer.apply_chat_template(messages(prompt, system_prompt))
    return tokenizer.encode(text, add_special_tokens=False)


def read_prompt(prompt: str) -> str:
    """`--prompt -` reads the prompt from stdin."""
    from dn.core.errors import DnError

    if prompt != "-":
        return prompt
    text = sys.stdin.read()
    if not text.strip():
        raise DnError("--prompt -: stdin is empty")
    return text.rstrip("\n")


def stream(run, ids: list[int], args, out=None, **kwargs) -> list[int]:
    """Generate from ids, printing the text as it comes (end-of-sequence tokens not shown); stats on stderr
    when args.verbose. Returns the tokens generated."""
    from dn.model.tokenizer import StreamDecoder
    from dn.runtime import memory

    out = out or sys.stdout
    mon = memory.Monitor(run.backend, run.memory) if run.residency is not None else None
    if mon:
        mon.reset()
        run.residency.reset_counters()
    decoder, tokens, start, first = StreamDecoder(run.tokenizer), [], time.perf_counter(), None
    for token in generate_tokens(run.backend, run.model, ids, args.max_tokens, args.temp, args.seed,
                                 run.tokenizer.eos_ids, **sampling_kwargs(args), max_kv_size=args.max_kv_size,
                                 kv_bits=args.kv_bits, **kwargs):
        first = first or time.perf_counter()
        tokens.append(token)
        if len(tokens) == 1 and run.residency is not None:  # report reads per decode step, not the prompt's
            run.residency.reset_counters()
        if mon:
            mon.sample()
        if token not in run.tokenizer.eos_ids:
            print(decoder.add(token), end="", flush=True, file=out)
    end = time.perf_counter()
    print(file=out)
    if args.verbose:
        n = len(tokens)
        decode_rate = (n - 1) / (end - first) if n > 1 else 0.0
        print(f"[{run.backend.NAME} {run.backend.device_name()} {args.dtype}] prompt {len(ids)} tokens "
              f"{len(ids) / (first - start):.1f} tok/s; generated {n} tokens {decode_rate:.1f} tok/s; "
              f"peak memory {memory.peak_bytes(run.backend) / 2**20:.0f} MiB", file=sys.stderr)
        if mon:
            print(residency_line(run.residency, mon.summary()), file=sys.stderr)
    return tokens


def residency_line(runtime, measured: dict) -> str:
    """What a run under --max-resident held and read, on one line."""
    mib = lambda n: f"{n / 2**20:.1f} MiB"
    st = runtime.stats()
    return (f"[residency {runtime.plan.mode}] budget {mib(runtime.plan.budget)}; resident while generating: "
            f"peak {mib(measured['resident_peak_bytes'])}, median {mib(measured['resident_median_bytes'])} "
            f"({measured['resident_kind']}); read {mib(st['fetched_bytes_per_token'])} per token, "
            f"hit rate {100 * st['hit_rate']:.0f}%")


def _main(argv) -> int:
    from dn.runtime import loader, residency

    args = setup_arg_parser().parse_args(argv)
    check_cache_args(args)
    prompt = read_prompt(args.prompt)
    run = loader.load(args.model, args.backend, args.dtype, **residency.load_args(args))
    stream(run, prompt_ids(run.tokenizer, prompt, args.raw, args.system_prompt), args)
    return 0


def main(argv=None) -> int:
    return cli.run(_main, argv)
