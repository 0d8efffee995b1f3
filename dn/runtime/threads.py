"""`--threads N`: one CPU thread count for every pool a run uses: torch's (OpenMP, MKL), OpenMP's, and dn's C
kernels (dn_torch.kernels.threads and dn/formats/csrc/gguf.c's pool take torch's count). MLX runs its CPU work on
threads of its own, which no flag here sets.

OpenMP reads its settings once, when torch loads it: setup() sets them before that. Its idle threads spin a while
before they sleep. On idle cores that is what makes 2 threads decode at least as fast as one on every path (batch-1
decode calls hundreds of short ops a token, and a sleeping thread's wake-up costs more than the op); on cores other
processes keep busy, a spinning thread takes the core another one needs and 2 threads decoded up to 25x slower
than one. So OMP_WAIT_POLICY=PASSIVE (threads sleep) only where the cores are busy when dn starts (busy()), and a
user's own OMP_WAIT_POLICY is kept (benchmarks/bench_threads.py measures both policies).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HELP = ("CPU threads for torch, OpenMP and dn's C kernels (default: $OMP_NUM_THREADS, else one per physical core "
        "this process may use; on cores other processes share, 1 can be faster). Idle threads spin a while, or sleep "
        "where the cores are busy when dn starts (OMP_WAIT_POLICY=PASSIVE unless set). MLX's CPU threads are its own")


def physical_cores() -> int:
    """The physical cores this process may run on (hyper-threads of one core count once), at most its cgroup's CPU
    quota."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # macOS: no affinity, no /sys
        return os.cpu_count() or 1
    cores = set()
    for c in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text(), (topo / "core_id").read_text()))
        except OSError:
            cores.add(c)
    n = len(cores)
    try:
        quota, period = (Path("/sys/fs/cgroup/cpu.max").read_text().split() + ["", ""])[:2]
        n = min(n, -(-int(quota) // int(period)))
    except (OSError, ValueError, ZeroDivisionError):  # no cgroup v2, or "max": no quota
        pass
    return max(1, n)


def busy(load: float | None = None, cores: int | None = None) -> bool:
    """Whether other work keeps the cores busy: a 1-minute load average of at least half this process's cores."""
    load = os.getloadavg()[0] if load is None else load
    return load >= (cores or physical_cores()) / 2


def setup() -> None:
    """What OpenMP reads when it loads: call before torch is imported (a no-op after). Idle threads sleep where the
    cores are busy, else spin as OpenMP's default has them."""
    if "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ and busy():
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def count(n: int | None = None) -> int:
    """n, else $OMP_NUM_THREADS (when a positive integer), else physical_cores()."""
    if n is not None:
        return n
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else physical_cores()


def apply(n: int | None = None) -> int:
    """Run on count(n) CPU threads from here on: OMP_NUM_THREADS (read by torch and OpenMP when they load, and by
    child processes), and torch's pools now when it is already loaded (dn's C kernels follow torch's count).
    Returns the count."""
    setup()
    n = count(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch = sys.modules.get("torch")  # not imported here: dn/ stays free of torch
    if torch is not None and torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def current(backend) -> int | None:
    """The thread count the backend's CPU work runs on (torch's), or None where dn does not set it (MLX) or the work
    runs on a GPU."""
    torch = sys.modules.get("torch") if backend.NAME == "torch" and backend.device_name() == "cpu" else None
    return torch.get_num_threads() if torch is not None else None
