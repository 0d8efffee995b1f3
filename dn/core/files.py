"""Where dn keeps what it makes (the cache folder) and the one way it writes a file or folder: under a temporary
name beside the destination, renamed over it at the end, so an interrupted or failed run leaves nothing
half-written."""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from platformdirs import user_cache_dir


def cache_dir() -> Path:
    """$DN_CACHE, else the user cache folder (~/.cache/dn on Linux)."""
    return Path(os.environ.get("DN_CACHE") or user_cache_dir("dn"))


@contextmanager
def atomic_file(path: str | os.PathLike):
    """Yields a fresh name beside path (nothing there yet) for the body to write; when the body ends without an
    exception, what it wrote there is renamed over path (a body that wrote nothing replaces nothing). On an
    exception the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        if tmp.exists():
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def as_made_by_mkdir(path: Path) -> None:
    """Give a folder from tempfile.mkdtemp (mode 0700) the mode a plain mkdir gives (0777 less the umask), so a
    folder renamed from it is readable by others as any folder the user makes."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o777 & ~mask)


@contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yields a new empty folder beside path; when the body ends without an exception it gets a plain mkdir's mode
    and is renamed to path (an OSError if path is a folder that is not empty). The temporary folder is removed
    whatever happens."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        as_made_by_mkdir(tmp)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def one_at_a_time(path: str | os.PathLike):
    """Holds an exclusive lock for the body (flock on the folder path is made in, so no lock file is left behind):
    processes that would make the same thing (pipeline ranks on one host building one cold tier) make it once, the
    others wait and find it made."""
    parent = Path(path).parent
    parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
