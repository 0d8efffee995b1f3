"""`dn codec stats PATH --json OUT`: bits per weight of the lossless codec, per tensor and in total."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from dn import cli
from dn.core import tensors
from dn.core.errors import DnError
from dn.footprint import write_json
from dn.formats import lossless
from dn.model.sources import resolve_model


def setup_arg_parser():
    p = cli.ArgumentParser(prog="dn codec", description="Lossless codec tools.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=cli.ArgumentParser)
    stats = sub.add_parser("stats", help="bits per weight of a safetensors file or model folder")
    stats.add_argument("path", help="safetensors file, model folder, .gguf or Hub repo id")
    stats.add_argument("--json", default=None, metavar="OUT", help="also write the per-tensor figures here")
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
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    every = [n for f in files for n in tensors.read_header(f)[0]]
    skipped = [n for n in every if n not in report["tensors"]]
    print(f"counted ({len(report['tensors'])}, every floating-point tensor of {', '.join(f.name for f in files)}): "
          f"{names(report['tensors'])}")
    if skipped:
        print(f"skipped ({len(skipped)}: not floating point, or a single value): {names(skipped)}")
    if args.json:
        write_json(report, args.json)
    return 0


def names(found) -> str:
    """Tensor names, a layer's once: model.layers.*.mlp.up_proj.weight (x30)."""
    groups: dict[str, int] = {}
    for n in found:
        key = re.sub(r"\.layers\.\d+\.", ".layers.*.", n)
        groups[key] = groups.get(key, 0) + 1
    return ", ".join(k if c == 1 else f"{k} (x{c})" for k, c in groups.items())


def main(argv=None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
