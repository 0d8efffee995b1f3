"""Memory measured by the platform, not an inventory of tensors: the process's resident pages (Linux /proc,
getrusage elsewhere) and, where a backend has one, its device allocator, around a model load.

Linux: /proc/self/smaps_rollup for Rss, Pss and Anonymous (file-backed = Rss - Anonymous - RssShmem), the
peak from VmHWM after a reset through /proc/self/clear_refs. Where clear_refs cannot be written the peak is
sampled; without /proc (macOS) it is getrusage's max RSS since the process started, which cannot be reset.
A process's first load measures exactly (dn footprint, dn eval). A later one can undercount: it may reuse pages
the allocator kept from memory freed before the baseline (glibc keeps the tops of per-thread arenas, which
malloc_trim does not release; up to 90 MiB seen on torch after freeing a model).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
import sys
import threading
from pathlib import Path

import numpy as np

_PROC = Path("/proc/self")
_SAMPLE_S = 0.005
_sampler = None  # the peak sampler, when clear_refs cannot be written


def parse_kib(text: str) -> dict[str, int]:
    """`Key:  123 kB` lines of /proc files -> {key: bytes}; other lines are skipped."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * 1024
    return out


def _read_kib(name: str) -> dict[str, int]:
    try:
        return parse_kib((_PROC / name).read_text())
    except OSError:
        return {}


def _maxrss() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def snapshot() -> dict:
    """The process's resident bytes now: rss, pss, anon, file (None where the platform cannot say), kind."""
    status, rollup = _read_kib("status"), _read_kib("smaps_rollup")
    if "Rss" in rollup and "Anonymous" in rollup:
        rss, anon = rollup["Rss"], rollup["Anonymous"]
        return {"kind": "process rss (smaps_rollup)", "rss": rss, "pss": rollup.get("Pss"), "anon": anon,
                "file": rss - anon - status.get("RssShmem", 0)}
    if "VmRSS" in status:
        return {"kind": "process rss (status)", "rss": status["VmRSS"], "pss": None,
                "anon": status.get("RssAnon"), "file": status.get("RssFile")}
    return {"kind": "max rss since start (getrusage)", "rss": _maxrss(), "pss": None, "anon": None, "file": None}


class _Sampler(threading.Thread):
    """Polls the RSS until stopped, keeping the largest value seen."""

    def __init__(self):
        super().__init__(daemon=True)
        self.max, self._done = snapshot()["rss"], threading.Event()
        self.start()

    def run(self):
        while not self._done.wait(_SAMPLE_S):
            self.max = max(self.max, snapshot()["rss"])

    def stop(self):
        self._done.set()
        self.join()


def reset_peak() -> str:
    """Start a new peak window (it lasts until the next reset); returns how peak() measures it."""
    global _sampler
    if _sampler is not None:
        _sampler.stop()
        _sampler = None
    try:
        (_PROC / "clear_refs").write_text("5")  # 5: reset VmHWM to the current RSS
        return "VmHWM (reset through clear_refs)"
    except OSError:  # PermissionError in some sandboxes, FileNotFoundError without /proc
        pass
    if _PROC.is_dir():
        _sampler = _Sampler()
        return f"rss sampled every {_SAMPLE_S * 1e3:.0f} ms (clear_refs not writable)"
    return "max rss since start (getrusage: cannot be reset)"


def peak() -> int:
    """The process's peak resident bytes since reset_peak(), as reset_peak() said it measures them."""
    if _sampler is not None:
        return max(_sampler.max, snapshot()["rss"])
    return _read_kib("status").get("VmHWM") or _maxrss()


def peak_bytes(backend) -> int:
    """The peak since the last measured load: the device allocator's where the backend has one."""
    stats = backend.memory_stats()
    return stats["peak_bytes"] if stats else peak()


def _settle(backend) -> None:
    """Drop garbage, empty the backend allocator's cache and hand freed heap pages back to the OS, so RSS
    shows what is held, not what once was."""
    gc.collect()
    backend.free(None)  # the model argument is unused: free() empties the allocator's cache
    trim()


def trim() -> None:
    """Hand the heap's free pages back to the OS (glibc keeps freed blocks under its mmap threshold resident)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim through
        ctypes.CDLL(None).malloc_trim(0)


def _delta(before: dict, after: dict, key: str) -> int | None:
    return None if before[key] is None or after[key] is None else after[key] - before[key]


def measure_load(backend, model_dir, spec, dtype: str, **load_args):
    """backend.load(model_dir, spec, dtype), measured: returns (model, figures). measured_resident_bytes and
    load_peak_bytes are what the load holds after it and at its peak, above the baseline taken just before
    it; rss_* are the process's view, reported beside them whatever measured_kind is."""
    backend.import_model_code(spec)  # before the baseline: imports are not weights
    _settle(backend)
    base, base_dev = snapshot(), backend.memory_stats(reset_peak=True)
    rss_peak_kind = reset_peak()
    model = backend.load(model_dir, spec, dtype, **{k: v for k, v in load_args.items() if v is not None})
    rss_peak = peak()
    _settle(backend)  # cached allocator blocks are free memory, not the model's
    after, dev = snapshot(), backend.memory_stats()
    figures = {f"{k}_bytes": _delta(base, after, k) for k in ("rss", "anon", "file", "pss")}
    figures.update(rss_kind=after["kind"], rss_peak_bytes=rss_peak - base["rss"], rss_peak_kind=rss_peak_kind,
                   measured_resident_bytes=figures["rss_bytes"], measured_kind=after["kind"],
                   load_peak_bytes=rss_peak - base["rss"], load_peak_kind=rss_peak_kind)
    if dev:
        # A device allocator's figures come first: Metal and CUDA buffers are not (reliably) in the process
        # RSS, and on MLX's CPU build the RSS also holds allocator-cached and malloc-retained pages.
        active = base_dev["active_bytes"]
        figures.update(measured_resident_bytes=dev["active_bytes"] - active, measured_kind=dev["kind"],
                       load_peak_bytes=max(dev["peak_bytes"], dev["active_bytes"]) - active,
                       load_peak_kind=dev["peak_kind"])
    return model, figures


class Monitor:
    """Memory the process holds above its pre-load baseline while it runs: the backend's allocator where it has
    one (MLX, CUDA), else the process's resident set. The baseline is what measure_load measured from: what is
    held right after the load minus what the load added. sample() once per step; summary() gives the peak
    (the allocator's or VmHWM since reset(), so between samples too), the median and the 99th percentile."""

    def __init__(self, backend, loaded: dict):
        self.be, self.samples = backend, []
        stats = backend.memory_stats()
        self.allocator = stats is not None
        if self.allocator:
            self.kind, self.base = stats["kind"], stats["active_bytes"] - loaded["measured_resident_bytes"]
        else:
            snap = snapshot()
            self.kind, self.base = snap["kind"], snap["rss"] - loaded["rss_bytes"]

    def now(self) -> int:
        if self.allocator:
            return self.be.memory_stats()["active_bytes"] - self.base
        return snapshot()["rss"] - self.base

    def reset(self) -> None:
        self.samples = []
        if self.allocator:
            self.be.memory_stats(reset_peak=True)
        else:
            reset_peak()

    def sample(self) -> int:
        self.samples.append(self.now())
        return self.samples[-1]

    def peak(self) -> int:
        if self.allocator:
            stats = self.be.memory_stats()
            top = max(stats["peak_bytes"], stats["active_bytes"])
        else:
            top = max(peak(), snapshot()["rss"])
        return max(top - self.base, *self.samples, 0)

    def summary(self) -> dict:
        s = np.asarray(self.samples or [self.now()])
        return {"resident_peak_bytes": int(self.peak()), "resident_median_bytes": int(np.median(s)),
                "resident_p99_bytes": int(np.percentile(s, 99)), "resident_samples": len(s),
                "resident_kind": self.kind}
