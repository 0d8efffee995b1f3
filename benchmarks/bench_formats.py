"""Weight formats on the default model: a thin caller of `dn bench` (dn/bench/), which does the work (each
(config, backend, dtype) in a fresh process: perplexity, accounted and measured resident bytes against dense bf16,
load peak, decode and prefill speed against dense in the same run). It keeps this script's defaults and flags so
the commands in docs/formats.md still run; the JSON has dn bench's shape (one record per config, backend, dtype
and batch, perplexity at each dtype).

    python benchmarks/bench_formats.py --text ../shared/data/eval.txt --json OUT [--markdown OUT.md] [dn bench flags]

is `dn bench` with the defaults below prepended (later flags win); `--steps N` is `--decode-tokens N` and
`--work DIR` is `--cache DIR`.
"""

from __future__ import annotations

import sys

from dn import bench

DEFAULTS = ["--configs", "dense,q4g32e8,q4g32,q4g64,q8g64,q3g32", "--backends", "torch,mlx",
            "--max-tokens", "torch:4096,mlx:1024", "--dtypes", "torch:float32+bfloat16,mlx:float32",
            "--decode-tokens", "20"]
RENAMED = {"--steps": "--decode-tokens", "--work": "--cache"}


def translate(argv: list[str]) -> list[str]:
    out = []
    for a in argv:
        flag, eq, value = a.partition("=")
        out.append(RENAMED.get(flag, flag) + eq + value)
    return DEFAULTS + out


def main(argv=None) -> int:
    return bench.main(translate(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
