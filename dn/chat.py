"""`dn chat`: a conversation in the terminal. Each line read is a user turn; the reply is generated over the
whole conversation (the chat template over the history), reusing the KV cache of the turns before."""

from __future__ import annotations

import sys

import numpy as np

from dn import cli
from dn.core.errors import DnError
from dn.generate import add_generation_args, check_cache_args, stream
from dn.runtime import loader, residency

HELP = "Type a message and press Enter; /reset starts over, /exit or end of input (Ctrl-D) ends."


def setup_arg_parser():
    p = cli.ArgumentParser(prog="dn chat", description="Chat with a model. " + HELP)
    add_generation_args(p)
    return p


def _read_line(interactive: bool) -> str | None:
    if interactive:
        try:
            return input(">> ")
        except EOFError:
            print()
            return None
    line = sys.stdin.readline()
    return line if line else None


def _main(argv) -> int:
    args = setup_arg_parser().parse_args(argv)
    check_cache_args(args)
    run = loader.load(args.model, args.backend, args.dtype, dense=args.dense, **residency.load_args(args))
    tok = run.tokenizer
    if not tok.chat_template:
        raise DnError("dn chat needs a model with a chat template (use dn generate --raw)")
    interactive = sys.stdin.isatty()
    if interactive:
        print(HELP, file=sys.stderr)
    start = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    history, cache, fed, rng = list(start), None, [], np.random.default_rng(args.seed)
    while (line := _read_line(interactive)) is not None:
        line = line.strip()
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history, cache, fed = list(start), None, []
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        ids = tok.encode(tok.apply_chat_template(history), add_special_tokens=False)
        if cache is None or ids[:len(fed)] != fed:  # the template rewrote earlier turns: start a fresh cache
            cache, fed = run.backend.make_cache(run.model, max_kv_size=args.max_kv_size, kv_bits=args.kv_bits), []
        tokens = stream(run, ids[len(fed):], args, cache=cache, rng=rng)
        fed = ids + tokens[:-1]  # what the cache holds: the last token yielded is never fed
        history.append({"role": "assistant", "content": tok.decode([t for t in tokens if t not in tok.eos_ids])})
    return 0


def main(argv=None) -> int:
    return cli.run(_main, argv)
