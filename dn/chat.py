"""`dn chat`: a conversation in the terminal. Each line read is a user turn; the reply is generated over the
whole conversation (the chat template over the history), reusing the KV cache of the turns before. On a terminal
the prompt has line editing and a history kept across sessions (readline, where Python has it)."""

from __future__ import annotations

import contextlib
import sys

import numpy as np

from dn import cli
from dn.core.errors import DnError
from dn.core.files import cache_dir
from dn.generate import add_generation_args, check_cache_args, stream
from dn.runtime import launch, loader, pipeline, residency

try:
    import readline  # input() gets line editing and history; absent on Windows builds, where input() is plain
except ImportError:
    readline = None

COMMANDS = {"/help": "list these commands", "/reset": "start a new conversation (the system prompt kept)",
            "/exit": "end the chat (also /quit, Ctrl-D, or Ctrl-C at the prompt)"}
HELP = "Type a message and press Enter; /help lists the commands. Ctrl-C stops a reply, Ctrl-D ends."
HISTORY_LINES = 1000
# what chat says on stderr: the local pipeline launcher shows these lines of rank 0's (dn.runtime.launch)
SAID = ("dn chat", "conversation reset", "reply stopped", "unknown command", "  /", HELP.split(";")[0])


def setup_arg_parser():
    p = cli.ArgumentParser(prog="dn chat", description="Chat with a model. " + HELP)
    add_generation_args(p)
    pipeline.add_args(p)
    return p


def history_file():
    """Where the prompt's history is kept: the dn cache folder ($DN_CACHE honoured)."""
    return cache_dir() / "chat_history"


def load_history() -> None:
    if readline is not None:
        readline.set_history_length(HISTORY_LINES)
        with contextlib.suppress(OSError):  # none yet, or unreadable: start without
            readline.read_history_file(history_file())


def save_history() -> None:
    if readline is not None:
        try:
            history_file().parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(history_file())
        except OSError as e:
            print(f"dn chat: history not saved ({e.strerror})", file=sys.stderr)


def _read_line(interactive: bool) -> str | None:
    """The next line; None at the end of input, or at Ctrl-C on the prompt (the chat ends cleanly)."""
    if not interactive:  # piped: Ctrl-C is an interruption (cli.run's "dn: interrupted", exit 130)
        line = sys.stdin.readline()
        return line if line else None
    try:
        return input(">> ")
    except (EOFError, KeyboardInterrupt):
        print()
        return None


def _main(argv) -> int:
    args = setup_arg_parser().parse_args(argv)
    check_cache_args(args)
    if args.pipeline is not None:  # launch the ranks (piped input handed to rank 0), or be one: rank 0 chats
        piped = sys.stdin.read() if launch.launched() is None and not sys.stdin.isatty() else None
        return pipeline.run(args, argv, "chat", lambda run: chat(run, args), stdin=piped, shown=SAID)
    return chat(loader.load(args.model, args.backend, args.dtype, dense=args.dense, **residency.load_args(args)),
                args)


def chat(run, args) -> int:
    """The conversation over a loaded model (run.backend may be a pipeline's: its ranks make a new cache when
    this one does, and extend it as this one is)."""
    args.dtype = run.dtype  # `auto` resolved by the loader, for the statistics line
    tok = run.tokenizer
    if not tok.chat_template:
        raise DnError("dn chat needs a model with a chat template (use dn generate --raw)")
    interactive = sys.stdin.isatty()
    if interactive:
        print(HELP, file=sys.stderr)
        load_history()
    try:
        return _converse(run, args, interactive)
    finally:
        if interactive:
            save_history()


def _converse(run, args, interactive: bool) -> int:
    tok = run.tokenizer
    start = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    history, cache, fed, rng = list(start), None, [], np.random.default_rng(args.seed)
    while (line := _read_line(interactive)) is not None:
        line = line.strip()
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history, cache, fed = list(start), None, []
            print("conversation reset: history and cache cleared", file=sys.stderr)
            continue
        if line == "/help":
            print("\n".join(f"  {c:<7} {h}" for c, h in COMMANDS.items()), file=sys.stderr)
            continue
        if line.startswith("/") and len(line.split()) == 1:
            print(f"unknown command {line} (/help lists them)", file=sys.stderr)
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        ids = tok.encode(tok.apply_chat_template(history), add_special_tokens=False)
        if cache is None or ids[:len(fed)] != fed:  # the template rewrote earlier turns: start a fresh cache
            cache, fed = run.backend.make_cache(run.model, max_kv_size=args.max_kv_size, kv_bits=args.kv_bits), []
        try:
            tokens = stream(run, ids[len(fed):], args, cache=cache, rng=rng)
        except KeyboardInterrupt:  # the cache may hold half a step: drop the turn, refill from the history
            print(flush=True)
            print("reply stopped (Ctrl-C): this turn is dropped", file=sys.stderr)
            history, cache, fed = history[:-1], None, []
            continue
        fed = ids + tokens[:-1]  # what the cache holds: the last token yielded is never fed
        history.append({"role": "assistant", "content": tok.decode([t for t in tokens if t not in tok.eos_ids])})
    return 0


def main(argv=None) -> int:
    return cli.run(_main, argv)
