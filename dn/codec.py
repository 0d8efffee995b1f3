"""`dn codec stats PATH --json OUT`: bits per weight of the lossless codec, per tensor and in total."""

from __future__ import annotations

import sys
from pathlib import Path

from dn import cli
from dn.core.errors import DnError
from dn.footprint import write_json
from dn.formats import lossless
from dn.model.sources import resolve_model


def setup_arg_parser():
    p = cli.ArgumentParser(prog="dn codec", description="Lossless codec tools.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=cli.ArgumentParser)
    stats = sub.add_parser("stats", help="bits per weight of a safetensors file or model folder")
    stats.add_argument("path", help="safetensors file, model folder, .gguf or Hub repo id")
    stats.add_argument("--json", default=None)
    return p


def _main(argv) -> int:
    args = setup_arg_parser().parse_args(argv)
    path = Path(args.path).expanduser()
    if not (path.is_file() and path.suffix == ".safetensors"):
        path = resolve_model(args.path, dense=True)  # the codec measures dense weights
    if not path.exists():
        raise DnError(f"no such file or folder: {path}")
    report = lossless.stats(path)
    t = report["total"]
    note = " (fp32 weights rounded to bf16 first)" if report["source_fp32_rounded_to_bf16"] else ""
    print(f"{len(report['tensors'])} tensors, {t['weights']} weights: {t['bits_per_weight']:.3f} bits/weight, "
          f"{t['bytes']} bytes ({t['bits_per_weight'] / 16:.1%} of 16-bit){note}")
    if args.json:
        write_json(report, args.json)
    return 0


def main(argv=None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
