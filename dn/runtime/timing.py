"""What every benchmark shares (dn bench, benchmarks/*.py): one timer and one JSON shape that records the machine,
the versions, the command and the commit.

JSON: {"machine": {...}, "versions": {...}, "command": "...", "commit": "...", "records": [{...}, ...]}.
Speed targets are ratios against a baseline timed in the same run; absolute times mean something only on
the machine recorded beside them.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dn.core.files import atomic_file

ROOT = Path(__file__).resolve().parents[2]  # the repo: dn/runtime/timing.py


def timer(fn: Callable[[], object], reps: int = 20, warmup: int = 3, sync: Callable[[], None] | None = None) -> dict:
    """Seconds per call of fn: median, p99, minimum, spread (interquartile range) over reps calls after warmup calls.
    sync (e.g. a device synchronize) runs before each clock read, so queued work is counted."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if sync:
            sync()
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t)
    q1, med, q3, p99 = np.percentile(times, [25, 50, 75, 99])
    return {"median_s": float(med), "p99_s": float(p99), "min_s": float(min(times)), "iqr_s": float(q3 - q1),
            "reps": reps, "warmup": warmup}


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int,
                sync: Callable[[], None] | None = None) -> dict[str, dict]:
    """timer over each fn in turn, one call of each per round: on shared cores every fn sees the same load, so
    their ratios hold even when the absolute times drift. -> {name: {median_s, iqr_s}}."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            times[k].append(timer(fn, reps=1, warmup=0, sync=sync)["median_s"])
    out = {}
    for k, ts in times.items():
        q1, med, q3 = np.percentile(ts, [25, 50, 75])
        out[k] = {"median_s": float(med), "iqr_s": float(q3 - q1)}
    return out


def commit() -> str:
    """HEAD of the repo the code runs from, with '+dirty' when the work tree has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def machine() -> dict:
    return {"system": platform.system(), "machine": platform.machine(), "processor": platform.processor(),
            "cpus": os.cpu_count(), "python": platform.python_version()}


def versions() -> dict:
    out = {}
    for name in ("dreamnova", "numpy", "torch", "transformers", "mlx", "mlx-lm"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):  # not installed: not listed
            out[name] = importlib.metadata.version(name)
    return out


def report(records: list[dict], command: list[str] | None = None, **extra) -> dict:
    return {"machine": machine(), "versions": versions(), "command": " ".join(command or sys.argv),
            "commit": commit(), **extra, "records": records}


def write(result: dict, path: str | Path) -> None:
    """Write through a temporary file and a rename, so an interrupted run leaves the old file whole."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(result, indent=1) + "\n")
