"""Shared fixtures: every backend-facing test runs once per installed backend (the Keras way)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

BACKENDS = ["mlx", "torch"]
ROOT = Path(__file__).resolve().parent.parent


def _installed(name: str) -> bool:
    return importlib.util.find_spec(f"dn_{name}") is not None and importlib.util.find_spec(name) is not None


@pytest.fixture(params=BACKENDS)
def backend_name(request):
    if not _installed(request.param):
        pytest.skip(f"backend {request.param} not installed")
    return request.param


@pytest.fixture
def backend(backend_name):
    from dn.runtime import backend as backends

    return backends.get(backend_name)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from dn.model.sources import resolve_model

    return resolve_model(None, progress=False)


@pytest.fixture(scope="session")
def default_spec(default_model_dir):
    from dn.model.spec import load_spec

    return load_spec(default_model_dir)


_LOADED = {}


@pytest.fixture
def loaded(backend, default_model_dir, default_spec):
    """The default model on this backend in float32, loaded once per session."""
    if backend.NAME not in _LOADED:
        _LOADED[backend.NAME] = backend.load(default_model_dir, default_spec, "float32")
    return _LOADED[backend.NAME]


@pytest.fixture(scope="session")
def tokenizer(default_model_dir, default_spec):
    from dn.model.tokenizer import Tokenizer

    return Tokenizer(default_model_dir, default_spec.architecture.eos_token_id)


def _shared_text(env: str, name: str) -> Path:
    """The text named by env, else ../shared/data/<name>; skip when neither exists."""
    value = os.environ.get(env)
    path = Path(value) if value else ROOT.parent / "shared" / "data" / name
    if not path.is_file():
        pytest.skip(f"no {name} (set {env})")
    return path


@pytest.fixture(scope="session")
def eval_text() -> Path:
    return _shared_text("DN_EVAL_TEXT", "eval.txt")


@pytest.fixture(scope="session")
def calib_text() -> Path:
    return _shared_text("DN_CALIB_TEXT", "calib.txt")


@pytest.fixture
def prompt_tokens(tokenizer) -> np.ndarray:
    text = "The quick brown fox jumps over the lazy dog because it wanted to see what was on the other side."
    return np.array([tokenizer.encode(text)])
