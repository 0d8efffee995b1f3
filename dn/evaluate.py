"""`dn eval`: perplexity over a text file in non-overlapping windows, plus footprint."""

from __future__ import annotations

import math
import sys

import numpy as np

from dn import cli, footprint
from dn.core.errors import DnError
from dn.core.text import read_text, text_path
from dn.model.sources import resolve_model
from dn.model.spec import load_spec
from dn.model.tokenizer import Tokenizer
from dn.runtime import loader, memory, pipeline, residency
from dn.runtime.generation import residency_line


def setup_arg_parser():
    p = cli.ArgumentParser(prog="dn eval", description="Perplexity over a text file, with footprint.")
    cli.add_model_args(p)
    p.add_argument("--text", default=None, help="UTF-8 text file (default: $DN_EVAL_TEXT)")
    p.add_argument("--ctx", type=cli.positive_int, default=512, help="window length in tokens")
    p.add_argument("--max-tokens", type=cli.positive_int, default=None, help="use only the first N tokens")
    p.add_argument("--batch", type=cli.positive_int, default=1, help="windows per forward pass")
    p.add_argument("--json", default=None, metavar="OUT", help="write the result here as JSON")
    residency.add_args(p)
    pipeline.add_args(p)
    return p


def windows(tokens: list[int], ctx: int, bos: int | None = None) -> list[np.ndarray]:
    """Non-overlapping windows of ctx tokens; a last window of one token predicts nothing and is dropped.
    bos: the token the model expects first (Tokenizer.bos_id): every window then starts with it and holds ctx-1
    text tokens, so each text token is predicted once, from a context the model was trained on (Gemma scores 3x
    worse without it); it is never a target, and the text's own leading bos is not doubled."""
    if bos is None:
        out = [np.asarray(tokens[i:i + ctx]) for i in range(0, len(tokens), ctx)]
        return [w for w in out if len(w) > 1]
    if ctx < 2:
        raise DnError(f"--ctx {ctx}: a window holds <bos> and at least one token")
    text = list(tokens[1:] if len(tokens) and tokens[0] == bos else tokens)
    return [np.asarray([bos, *text[i:i + ctx - 1]]) for i in range(0, len(text), ctx - 1)]


def perplexity(backend, model, tokens: list[int], ctx: int, batch: int = 1,
               progress: bool = False, on_chunk=None, bos: int | None = None) -> tuple[float, int]:
    """(mean NLL per predicted token, number of predicted tokens); progress: a bar on stderr (cli.progress);
    bos: Tokenizer.bos_id, put at the start of every window (windows)."""
    wins = windows(tokens, ctx, bos)
    if not wins:
        raise DnError("the text has fewer than two tokens")
    full = [w for w in wins if len(w) == ctx]
    chunks = [np.stack(full[i:i + batch]) for i in range(0, len(full), batch)]
    chunks += [w[None] for w in wins if len(w) != ctx]  # [B, L] each
    total, count = 0.0, 0
    bar = cli.progress(sum(len(w) - 1 for w in wins), "dn eval", "tok") if progress else None
    for chunk in chunks:
        nll = backend.token_nll(model, chunk)
        total, count = total + float(nll.sum()), count + nll.size
        if on_chunk is not None:
            on_chunk()
        if bar is not None:
            bar.update(nll.size)
    if bar is not None:
        bar.close()
    return total / count, count


def text_tokens(model: str | None, text: str) -> list[int]:
    """The text as the model's tokens, before any weight is loaded (a text too short fails at once)."""
    model_dir = resolve_model(model)
    return Tokenizer(model_dir, load_spec(model_dir).architecture.eos_token_id).encode(text)


def _main(argv) -> int:
    args = setup_arg_parser().parse_args(argv)
    path = text_path(args.text, "DN_EVAL_TEXT")
    tokens = text_tokens(args.model, read_text(path))
    if len(tokens) < args.ctx:
        raise DnError(f"{path} has {len(tokens)} tokens, fewer than one window of --ctx {args.ctx}: "
                      "pass a smaller --ctx or a longer text")
    if args.pipeline is not None:  # launch the ranks, or be one: rank 0 evaluates (dn.runtime.pipeline)
        return pipeline.run(args, argv, "eval", lambda run: evaluate(run, args, tokens))
    evaluate(loader.load(args.model, args.backend, args.dtype, dense=args.dense, **residency.load_args(args)), args,
             tokens)
    return 0


def evaluate(run, args, tokens: list[int]) -> None:
    """The perplexity of tokens over a loaded model (run.backend may be a pipeline's), printed and --json."""
    args.dtype = run.dtype  # `auto` resolved by the loader
    if args.max_tokens:
        tokens = tokens[:args.max_tokens]
    mon = memory.Monitor(run.backend, run.memory)
    mon.reset()
    if run.residency is not None:
        run.residency.prompt_tokens = args.ctx // residency.PROMPT_SHARE  # per-sequence: a window's prompt
    nll, count = perplexity(run.backend, run.model, tokens, args.ctx, args.batch, progress=True,
                            on_chunk=mon.sample, bos=run.tokenizer.bos_id)
    acc = footprint.accounted(run.spec, args.dtype, args.ctx)
    result = {"model": "default" if args.model is None else str(args.model), "backend": run.backend.NAME,
              "device": run.backend.device_name(), "dtype": args.dtype, "tokens": count,
              "ppl": math.exp(nll), "nll": nll,
              "resident_weight_bytes": acc["resident_weight_bytes"],  # accounted
              "dense_weight_bytes": acc["dense_weight_bytes"], **run.memory,  # measured by the platform
              "peak_memory_bytes": memory.peak_bytes(run.backend),  # load and eval, absolute
              **mon.summary(), **residency.fields(run.residency)}  # over the evaluation, above the baseline
    print(f"[{result['backend']} {result['device']} {args.dtype}] ppl {result['ppl']:.4f} over {count} tokens; "
          f"resident weights {result['resident_weight_bytes'] / 2**20:.1f} MiB accounted "
          f"(dense {result['dense_weight_bytes'] / 2**20:.1f} MiB), "
          f"{result['measured_resident_bytes'] / 2**20:.1f} MiB measured ({result['measured_kind']}), "
          f"load peak {result['load_peak_bytes'] / 2**20:.1f} MiB; peak {result['peak_memory_bytes'] / 2**20:.0f} MiB")
    if run.residency is not None:
        print(residency_line(run.residency, result).replace("while generating", "while evaluating"))
    if args.json:
        footprint.write_json(result, args.json)


def main(argv=None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
