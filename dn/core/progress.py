"""The one progress bar: tqdm on stderr for a long run."""

from __future__ import annotations

import sys


def progress(total: int, desc: str, unit: str, delay: float = 0.0, **kwargs):
    """A tqdm bar on stderr for a long run; off when stderr is not a terminal (logs, pipes, tests). delay: drawn
    only once the run has lasted that many seconds (a quick one leaves the terminal as it was). kwargs: tqdm's
    (unit_scale=True for bytes)."""
    from tqdm import tqdm  # late: ~100 ms of imports, paid only by the long runs that draw a bar

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not sys.stderr.isatty(), leave=False,
                delay=delay, **kwargs)
