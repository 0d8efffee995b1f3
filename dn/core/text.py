"""Reading evaluation and calibration text given by path (flag or environment variable)."""

from __future__ import annotations

import os
from pathlib import Path

from dn.core.errors import DnError, reworded


def text_path(flag: str | None, env: str) -> Path:
    value = flag or os.environ.get(env)
    if not value:
        raise DnError(f"no text file given (pass --text/--calib-text or set {env})")
    return Path(value).expanduser()


def read_text(path: Path) -> str:
    with reworded({FileNotFoundError: f"no such text file: {path}",
                   IsADirectoryError: f"{path} is a folder, not a text file",
                   UnicodeDecodeError: f"{path} is not UTF-8 text",
                   OSError: lambda e: f"cannot read {path}: {e.strerror}"}):
        text = Path(path).read_text(encoding="utf-8")
    if not text.strip():
        raise DnError(f"text file {path} is empty")
    return text
