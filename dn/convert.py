"""`dn convert`: write a model folder dn loads with --model DIR: plain, lossless-compressed, and/or sparse.

Everything is written into a temporary folder beside --out and renamed at the end, so an interrupted
or failed run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from dn import cli, sparse
from dn.errors import DnError

COPY = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json", "chat_template.jinja", "tokenizer.model")


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
    p.add_argument("--sparsity", type=sparsity, default=None, help="MLP sparsity in (0, 1): fit routers/priors")
    p.add_argument("--calib-text", default=None, help="calibration text (default: $DN_CALIB_TEXT)")
    p.add_argument("--prior", default=None, choices=sparse.PRIORS,
                   help=f"prior for --sparsity (default {sparse.DEFAULT_PRIOR})")
    p.add_argument("--router", default=None, choices=["int4", "lowrank"], help="router for --sparsity (default int4)")
    p.add_argument("--select", default=None, choices=["threshold", "topk"],
                   help="per-token selection for --sparsity: calibrated threshold, varying count (default), "
                        "or a fixed top-k count")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto", choices=["auto", "mlx", "torch"],
                   help="backend that runs the dense model during calibration")
    return p


def copy_dense(src: Path, dst: Path) -> None:
    for name in COPY:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    for f in sorted(src.glob("*.safetensors")):
        shutil.copy2(f, dst / f.name)


def convert(src: Path, out: Path, codec: str | None, sparse_args: dict | None) -> None:
    from dn.spec import load_spec

    spec = load_spec(src)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        if codec:
            from dn import codec as lossless

            spec.codec = lossless.compress_model(src, tmp)
        else:
            copy_dense(src, tmp)
        if sparse_args is not None:
            from dn import calibrate

            spec.sparse = calibrate.calibrate(src, tmp, **sparse_args)
        spec.source = str(src)
        spec.save(tmp)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _main(argv) -> int:
    from dn.sources import resolve_model
    from dn.text import read_text, text_path

    args = setup_arg_parser().parse_args(argv)
    out = Path(args.out).expanduser()
    if out.exists():
        raise DnError(f"{out} already exists (dn convert writes a new folder)")
    if not out.parent.is_dir():
        raise DnError(f"parent folder {out.parent} does not exist")
    sparse_args = None
    if args.sparsity is not None:
        text = read_text(text_path(args.calib_text, "DN_CALIB_TEXT"))  # fail before any work
        sparse_args = {"sparsity": args.sparsity, "calib_text": text, "prior": args.prior,
                       "seed": args.seed, "backend": args.backend}
        sparse_args |= {k: v for k, v in (("router", args.router), ("select", args.select)) if v}
    elif args.prior or args.calib_text or args.router or args.select:
        raise DnError("--prior, --router, --select and --calib-text need --sparsity")
    convert(resolve_model(args.model), out, args.codec, sparse_args)
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
