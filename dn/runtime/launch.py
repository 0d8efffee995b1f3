"""How the ranks of a pipeline (dn.runtime.pipeline) are started: under torchrun or mlx.launch, or by `dn <verb>
--pipeline N` without one, which starts N local ranks through the backend's launcher (`launch`) and turns what
the launcher says about a failed rank into one line."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from dn.core.errors import DnError
from dn.runtime import threads

GRACE_S = 5.0  # after a rank's error line, how long the local launcher may take to end the others
STDIN_ENV = "DN_PIPELINE_STDIN"  # a file holding the piped input the local launcher hands to rank 0


def launched() -> str | None:
    """The launcher this process runs under: torch (torchrun's env), mlx (mlx.launch's), or None."""
    if "TORCHELASTIC_RUN_ID" in os.environ or {"RANK", "WORLD_SIZE"} <= os.environ.keys():
        return "torch"
    return "mlx" if "MLX_RANK" in os.environ else None


def _free_port(span: int = 1) -> int:
    """A port with `span` free ports from it (mlx.launch's ring listens on one per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with socket.socket() as s:  # nothing listens on the next ones
            if port + span < 65536 and all(s.connect_ex(("127.0.0.1", port + i)) for i in range(1, span)):
                return port
    raise DnError("no free local ports for the pipeline's ranks")


def rank_argv(argv: list[str], backend: str) -> list[str]:
    """The verb's own argv for each rank: `--pipeline N` becomes `--pipeline`, the backend named."""
    out = [a for i, a in enumerate(argv) if a != "--pipeline" and not a.startswith("--pipeline=")
           and not (i and argv[i - 1] == "--pipeline" and a.isdigit())]
    return [*out, "--pipeline", "--backend", backend]


def launcher_command(backend: str, n: int, verb: str, argv: list[str]) -> list[str]:
    rank = [sys.executable, "-m", "dn", verb, *rank_argv(argv, backend)]
    if backend == "torch":
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(n),
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--monitor-interval",
                "0.5", *rank[1:]]
    exe = Path(sys.executable).with_name("mlx.launch")  # the venv's own, else the PATH's
    if not (exe := str(exe) if exe.is_file() else shutil.which("mlx.launch")):
        raise DnError("mlx.launch is not installed (pip install mlx)")
    return [exe, "--backend", "ring", "--hosts", "127.0.0.1", "-n", str(n), "--starting-port", str(_free_port(n)),
            "--", *rank]


# the launchers' own words for a rank that failed
_FAILED = [re.compile(r"rank\s*:\s*(\d+) \(local_rank.*\n\s*exitcode\s*:\s*(-?\d+)"),  # torchrun's summary
           re.compile(r"Node with rank (\d+) exited with code (-?\d+)"),  # mlx.launch
           re.compile(r"Node with rank (\d+) (was killed)")]
_OURS = ("rank ", "dn: ", "[torch", "[mlx", "[residency")


def _exit_text(code: str) -> str:
    if code.lstrip("-").isdigit() and -int(code) in signal.valid_signals():
        return f"died of {signal.Signals(-int(code)).name}"
    return "was stopped by the launcher" if code == "was killed" else f"exited with code {code}"


def _end(proc) -> None:
    """SIGKILL the launcher and every process under it (torchrun puts its workers in sessions of their own)."""
    table = subprocess.run(["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.split()
    parents, tree = dict(zip(map(int, table[::2]), map(int, table[1::2]))), [proc.pid]
    for pid in tree:  # grows as it goes: children, theirs...
        tree += [c for c, parent in parents.items() if parent == pid]
    for pid in tree:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def launch(backend: str, n: int, verb: str, argv: list[str], stdin: str | None = None, shown: tuple = ()) -> int:
    """`dn <verb> --pipeline N` without a launcher: N local ranks through the backend's launcher. stdout passes
    through; of stderr, dn's own lines (rank stats, the verb's statistics, lines starting as `shown`); the
    launchers' logs are kept back and a failure is one line naming the rank that failed first, with what the
    others said. stdin: piped input read here, handed to rank 0 in a file (mlx.launch never passes an end of
    input on); a terminal stays the ranks' stdin. SIGTERM here ends every rank."""
    if n < 1:
        raise DnError("--pipeline N: N >= 1 ranks")
    per_rank = max(1, threads.count() // n)  # the local ranks share this machine's cores
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(per_rank)}
    with contextlib.ExitStack() as stack:
        quiet = None
        if stdin is not None:
            f = stack.enter_context(tempfile.NamedTemporaryFile("w", prefix="dn-stdin-", suffix=".txt"))
            f.write(stdin)
            f.flush()
            env[STDIN_ENV] = f.name
        # not a terminal: a stdin that never ends (mlx.launch spins on an ended one)
        if stdin is not None or sys.stdin is None or not sys.stdin.isatty():
            quiet, writer = os.pipe()
            stack.callback(os.close, writer)
            stack.callback(os.close, quiet)
        if threading.current_thread() is threading.main_thread():
            stack.callback(signal.signal, signal.SIGTERM, signal.signal(signal.SIGTERM, _terminated))
        proc = subprocess.Popen(launcher_command(backend, n, verb, argv), stdin=quiet, stderr=subprocess.PIPE,
                                text=True, env=env, errors="replace")
        return _watch(proc, backend, shown)


def _terminated(*_):
    raise SystemExit(143)  # launch's handler ends the ranks


def _watch(proc, backend: str, shown: tuple) -> int:
    kept, errors, grace = [], [], None
    try:
        for line in proc.stderr:
            if line.startswith("dn: error: "):
                errors.append(line[len("dn: error: "):].strip())
                # a launcher waits on a hung rank (SIGTERM stays pending on a stopped process): GRACE_S, then all
                if grace is None:
                    grace = threading.Timer(GRACE_S, _end, (proc,))
                    grace.start()
            elif line.startswith((*_OURS, *shown)):
                print(line, end="", file=sys.stderr, flush=True)
            else:
                kept.append(line)
        rc = proc.wait()
    except BaseException:
        _end(proc)
        raise
    finally:
        if grace is not None:
            grace.cancel()
    log = "".join(kept)
    failed = [(int(r), c) for pat in _FAILED for r, c in pat.findall(log)]
    if rc == 0 and not failed and not errors:
        return 0
    # the first rank that failed on its own: not one the launcher stopped once another had failed
    own = [(r, c) for r, c in failed if c not in ("-15", "143", "was killed")] or failed
    said = "; ".join(dict.fromkeys(errors)) or next((x.strip() for x in reversed(kept)  # a rank's own traceback
                                                     if re.match(r"(\[rank\d+\]: )?\w+(Error|Exception): ", x)
                                                     and "ChildFailedError" not in x), "")
    if said and all(c == "2" for _, c in own):  # every rank said why (a DnError): that is the line
        line = said
    elif own:
        r, c = min(own)
        line = f"rank {r} {_exit_text(c)}" + (f" ({said})" if said else "")
    else:
        line = said or f"the {backend} launcher failed (exit code {rc}): {log.strip().splitlines()[-1:]}"
    print(f"dn: error: pipeline: {line}", file=sys.stderr, flush=True)
    return rc if rc > 0 else 2
