"""The one progress bar: tqdm on stderr for a long run."""

from __future__ import annotations

import sys


def progress(total: int, desc: str, unit: str):
    """A tqdm bar on stderr for a long run; off when stderr is not a terminal (logs, pipes, tests)."""
    from tqdm import tqdm  # late: ~100 ms of imports, paid only by the long runs that draw a bar

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not sys.stderr.isatty(), leave=False)
