"""`dn convert`: write a model folder dn loads with --model DIR: plain, lossless-compressed or quantized,
and/or sparse (the writing is dn.runtime.writer's).

Everything is written into a temporary folder beside --out and renamed at the end, so an interrupted
or failed run leaves nothing behind. --upload-repo USER/NAME then adds a model card and pushes the folder to
the Hugging Face Hub (dn/hub.py); a failed upload keeps the folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dn import cli, hub
from dn.cache import human, size
from dn.core import tensors
from dn.core.errors import DnError
from dn.core.text import read_text
from dn.formats import quant, sparse
from dn.model.sources import resolve_model
from dn.model.spec import inventory, weight_files
from dn.runtime.writer import checked, convert

Q_FLAGS = ("q_bits", "q_group_size", "q_embedding_bits", "q_embedding_group_size")


def sparsity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"sparsity must be in (0, 1), got {text!r}")
    return value


def setup_arg_parser():
    p = cli.ArgumentParser(prog="dn convert", description="Write a model folder for dn.")
    p.add_argument("--model", default=None, help="source: folder, .gguf or Hub repo id (default: embedded)")
    p.add_argument("--out", required=True, help="new folder to write (must not exist)")
    p.add_argument("--codec", choices=["lossless"], default=None, help="compress the weights losslessly")
    p.add_argument("-q", "--quantize", action="store_true",
                   help="quantize Linear and Embedding weights, affine group-wise, in mlx-lm's layout "
                        "(mlx_lm.load reads it)")
    p.add_argument("--q-bits", type=int, default=None, help=f"bits per weight for -q, one of {quant.BITS} (default 4)")
    p.add_argument("--q-group-size", type=int, default=None,
                   help=f"weights per scale and bias for -q, one of {quant.GROUP_SIZES} (default 64)")
    p.add_argument("--q-embedding-bits", type=int, default=None, help="bits of the embedding (default --q-bits)")
    p.add_argument("--q-embedding-group-size", type=int, default=None,
                   help="group size of the embedding (default --q-group-size)")
    p.add_argument("--sparsity", type=sparsity, default=None, help="MLP sparsity in (0, 1): fit routers/priors")
    p.add_argument("--calib-text", default=None, help="calibration text (default: $DN_CALIB_TEXT)")
    p.add_argument("--prior", default=None, choices=sparse.PRIORS,
                   help=f"prior for --sparsity (default {sparse.DEFAULT_PRIOR})")
    p.add_argument("--router", default=None, choices=["planes", "int4", "lowrank"],
                   help="router for --sparsity (default: planes, the weights' own split planes, when fitting "
                        f"through torch on a CPU; else {sparse.DEFAULT_ROUTER})")
    p.add_argument("--select", default=None, choices=["threshold", "topk"],
                   help="per-token selection for --sparsity: calibrated threshold, varying count (default), "
                        "or a fixed top-k count")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto", choices=["auto", "mlx", "torch"],
                   help="backend that runs the dense model during calibration (and --card-eval-text)")
    p.add_argument("--upload-repo", default=None, metavar="USER/NAME",
                   help="push the converted folder to this Hugging Face Hub repo, with a model card (README.md)")
    p.add_argument("--private", action="store_true", help="create the --upload-repo repo private")
    p.add_argument("--card-eval-text", default=None, metavar="FILE",
                   help="measure perplexity of the result and of its source on this text for the model card "
                        "(otherwise the card says quality was not measured)")
    p.add_argument("--card-eval-tokens", type=cli.positive_int, default=None,
                   help="tokens of --card-eval-text to evaluate (default 4096)")
    return p


def quantize_args(args) -> tuple | None:
    """The -q flags, in writer.quantization's order (None without -q)."""
    if not args.quantize:
        if any(getattr(args, f) is not None for f in Q_FLAGS):
            raise DnError(f"{', '.join('--' + f.replace('_', '-') for f in Q_FLAGS)} need -q")
        return None
    return tuple(getattr(args, f) for f in Q_FLAGS)


def _main(argv) -> int:
    args = setup_arg_parser().parse_args(argv)
    out, quantize, sparse_args = checked(args.out, args.codec, quantize_args(args), args.sparsity, args.calib_text,
                                         args.prior, args.seed, args.backend, args.router, args.select)
    if args.sparsity is None and (args.prior or args.calib_text or args.router or args.select):
        raise DnError("--prior, --router, --select and --calib-text need --sparsity")
    card_text = upload_args(args)
    src = resolve_model(args.model, dense=True)  # formats are made from the dense values
    convert(src, out, args.codec, sparse_args, quantize)
    if quantize:
        print(f"[INFO] Quantized model with {bits_per_weight(out, src):.3f} bits per weight.")  # mlx-lm's line
    print(f"wrote {out} ({human(size(out))})")
    if args.upload_repo:
        quality = None
        if card_text is not None:
            try:
                quality = hub.measure(out, src, card_text, Path(args.card_eval_text).name, args.backend,
                                      args.card_eval_tokens or hub.CARD_EVAL_TOKENS)
            except DnError as e:
                raise DnError(f"{e}; the converted folder is kept at {out}") from None
        url = hub.publish(out, args.upload_repo, private=args.private, base=hub.base_model(args.model),
                          quality=quality)
        print(f"uploaded {out} to {url}")
    return 0


def bits_per_weight(out: Path, src: Path) -> float:
    """As mlx-lm counts it: every stored tensor byte of the folder (scales, biases and norms included) over the
    model's weights (the dense source's tensor elements)."""
    stored = sum(h["data_offsets"][1] - h["data_offsets"][0]
                 for f in weight_files(out) for h in tensors.read_header(f)[0].values())
    return 8 * stored / sum(t.numel for t in inventory(src))


def upload_args(args) -> str | None:
    """Check the upload flags before any work; the --card-eval-text text, read now (None without it)."""
    if not args.upload_repo:
        if args.private or args.card_eval_text or args.card_eval_tokens:
            raise DnError("--private, --card-eval-text and --card-eval-tokens need --upload-repo")
        return None
    hub.preflight(args.upload_repo)
    if args.card_eval_tokens and not args.card_eval_text:
        raise DnError("--card-eval-tokens needs --card-eval-text")
    return read_text(Path(args.card_eval_text).expanduser()) if args.card_eval_text else None


def main(argv=None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
