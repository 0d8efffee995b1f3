"""`dn <verb>`: one module per verb, each with setup_arg_parser() and main(argv) (as in mlx-lm)."""

from __future__ import annotations

import argparse
import importlib
import sys

from dn.core import __version__
from dn.core.errors import DnError
from dn.core.progress import progress  # noqa: F401  (cli.progress: the verbs' bar)
from dn.runtime import threads

VERBS = {
    "generate": ("dn.generate", "stream text from a model"),
    "chat": ("dn.chat", "a conversation in the terminal, kept across turns"),
    "serve": ("dn.serve", "the OpenAI API over HTTP (chat and text completions, streamed)"),
    "eval": ("dn.evaluate", "perplexity over a text file, with footprint"),
    "parity": ("dn.parity", "compare the backends on the same model"),
    "footprint": ("dn.footprint", "bytes by role, accounted and measured"),
    "convert": ("dn.convert", "write a model folder (optionally compressed or sparse)"),
    "codec": ("dn.codec", "lossless codec tools (stats)"),
    "bench": ("dn.bench", "weight configurations x backends against dense: memory, quality, speed"),
    "cache": ("dn.cache", "what dn keeps in its cache folder, with sizes (ls), and its removal (rm)"),
}


class HelpFormatter(argparse.HelpFormatter):
    """Shows each flag's default in --help (none for flags without one, or off by default)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if shows_default(action) and "%(default)" not in text and "default:" not in text:
            text += (" " if text else "") + "(default: %(default)s)"
        return text


def shows_default(action) -> bool:
    return (action.default is not None and action.default is not argparse.SUPPRESS and action.nargs != 0
            and bool(action.option_strings))


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line, not usage plus error, and shows defaults in --help. `--dtype
    auto` stays "auto" here: the loader resolves it once the store's formats are known (loader.compute_dtype)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        if action.help is None and shows_default(action):  # argparse shows no help line, so no default, without one
            action.help = "(default: %(default)s)"
        return action


def _number(text: str, cast, ok, want: str):
    """A flag's number, or argparse's one-line error naming what was wanted."""
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "a positive integer")


def non_negative_float(text: str) -> float:
    return _number(text, float, lambda v: 0 <= v < float("inf"), "a finite number >= 0")


def fraction(text: str) -> float:
    return _number(text, float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def non_negative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def thread_count(text: str) -> int:
    return _number(text, int, lambda v: 1 <= v <= 1024, "an integer in 1..1024")


def add_model_args(parser, dtype_default="auto"):
    parser.add_argument("--model", default=None,
                        help="model folder, .gguf file or Hub repo id (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--backend", default="auto", choices=["auto", "mlx", "torch"],
                        help="auto: MLX on Apple silicon, torch elsewhere")
    parser.add_argument("--dtype", default=dtype_default, choices=["auto", "float32", "bfloat16"],
                        help="compute dtype; auto: bfloat16 on Metal and CUDA; on a CPU the dtype the store's "
                             "formats have fast kernels for (bfloat16 for affine folders on torch), else float32")
    parser.add_argument("--dense", action="store_true",
                        help="widen a GGUF to bf16 first (default: run its quantized blocks as they are)")
    add_threads_arg(parser)


class _Threads(argparse.Action):
    """--threads takes effect as it is parsed (threads.apply), before any verb imports torch."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, threads.apply(values))


def add_threads_arg(parser) -> None:
    """--threads N: every verb that runs a model (dn.runtime.threads)."""
    parser.add_argument("--threads", type=thread_count, action=_Threads, default=None, metavar="N", help=threads.HELP)


class _LineWatch:
    """A stream that remembers whether its last write left a line open (a reply streamed so far, a \\r status
    line); a \\r at the end (a bar erasing itself) leaves the cursor at the start of a line."""

    def __init__(self, stream):
        self._stream, self.open = stream, False

    def write(self, text: str) -> int:
        if text:
            self.open = not text.endswith(("\n", "\r"))
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def run(main, argv=None) -> int:
    """Run a verb's body; a DnError becomes one line on stderr and exit code 2, Ctrl-C "dn: interrupted" on a line
    of its own (after the open line of a reply or status, and after the terminal's ^C echo) and exit code 130."""
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _LineWatch(out), _LineWatch(err)
    try:
        return main(argv) or 0
    except DnError as e:
        print(f"dn: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if sys.stdout.open:
            print(file=sys.stdout, flush=True)
        if sys.stderr.open or (err.isatty() and not sys.stdout.open):
            print(file=sys.stderr)
        print("dn: interrupted", file=sys.stderr)
        return 130
    finally:
        sys.stdout, sys.stderr = out, err


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        lines = [f"  {v:<13} {h}" for v, (_, h) in VERBS.items()]
        print("usage: dn <verb> [options]   (dn <verb> --help for a verb's options)\n\nverbs:\n" + "\n".join(lines)
              + "\n\noptions:\n  -h, --help    show this help\n  -V, --version print dn's version")
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"dn {__version__}")
        return 0
    if argv[0] not in VERBS:
        print(f"dn: error: unknown verb {argv[0]!r} (choose from {', '.join(VERBS)})", file=sys.stderr)
        return 2
    threads.apply()  # OpenMP's settings before torch loads; --threads N, parsed later, overrides the count
    module = importlib.import_module(VERBS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
