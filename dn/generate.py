"""`dn generate`: stream text from a model; the chat template is applied for instruct models."""

from __future__ import annotations

import argparse
import sys

from dn import cli
from dn.core.errors import DnError
from dn.runtime import loader, memory, pipeline, residency, threads
from dn.runtime.generation import check_cache, prompt_ids, residency_line, stream_generate


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
    residency.add_args(p)


def _bool(text: str) -> bool:
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
    pipeline.add_args(p)
    return p


def check_cache_args(args) -> None:
    check_cache(args.kv_bits, args.max_kv_size)


def sampling_kwargs(args) -> dict:
    return {"top_p": args.top_p, "min_p": args.min_p, "top_k": args.top_k}


def read_prompt(prompt: str) -> str:
    """`--prompt -` reads the prompt from stdin."""
    if prompt != "-":
        if not prompt.strip():
            raise DnError("--prompt is empty")
        return prompt
    text = sys.stdin.read()
    if not text.strip():
        raise DnError("--prompt -: stdin is empty")
    return text.rstrip("\n")


def stream(run, ids: list[int], args, out=None, **kwargs) -> list[int]:
    """Generate from ids, printing the text as it comes (end-of-sequence tokens not shown); stats on stderr
    when args.verbose. Returns the tokens generated."""
    out = out or sys.stdout
    mon = memory.Monitor(run.backend, run.memory) if run.residency is not None else None
    if mon:
        mon.reset()
        run.residency.reset_counters()
    tokens, r = [], None
    for r in stream_generate(run, ids, args.max_tokens, args.temp, args.seed, **sampling_kwargs(args),
                             max_kv_size=args.max_kv_size, kv_bits=args.kv_bits, **kwargs):
        tokens.append(r.token)
        if mon:
            mon.sample()
        if r.text:
            print(r.text, end="", flush=True, file=out)
    print(file=out)
    if args.verbose:
        n = threads.current(run.backend)
        cpu = f", {n} thread{'s' * (n > 1)}" if n else ""
        print(f"[{run.backend.NAME} {run.backend.device_name()} {args.dtype}{cpu}] "
              f"prompt {len(ids)} tokens "
              f"{r.prompt_tps:.1f} tok/s; generated {len(tokens)} tokens {r.generation_tps:.1f} tok/s; "
              f"peak memory {memory.peak_bytes(run.backend) / 2**20:.0f} MiB", file=sys.stderr)
        if mon:
            print(residency_line(run.residency, mon.summary()), file=sys.stderr)
    return tokens


def _main(argv) -> int:
    args = setup_arg_parser().parse_args(argv)
    check_cache_args(args)
    prompt = read_prompt(args.prompt)
    if args.pipeline is not None:  # launch the ranks, or be one (dn.runtime.pipeline)
        return pipeline.run(args, argv, "generate", lambda run: stream(
            run, prompt_ids(run.tokenizer, prompt, args.raw, args.system_prompt), args), prompt)
    run = loader.load(args.model, args.backend, args.dtype, dense=args.dense, **residency.load_args(args))
    args.dtype = run.dtype  # `auto` resolved by the loader
    stream(run, prompt_ids(run.tokenizer, prompt, args.raw, args.system_prompt), args)
    return 0


def main(argv=None) -> int:
    return cli.run(_main, argv)
