"""Shared fixtures: every backend-facing test runs once per installed backend (the Keras way)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import require_native_in_ci

require_native_in_ci()  # under CI=true a C kernel that fails to build fails the run (tests/helpers.py)

BACKENDS = ["mlx", "torch"]
ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
# The verbs read $DN_EVAL_TEXT and $DN_CALIB_TEXT themselves (subprocess tests too): without ../shared they name the
# repository's small texts, so no test depends on where the clone sits.
for _var, _name in (("DN_EVAL_TEXT", "eval-small.txt"), ("DN_CALIB_TEXT", "calib-small.txt")):
    os.environ.setdefault(_var, str(DATA / _name))


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

    return resolve_model(None, progress=False, dense=True)  # the widening: what the format tests convert from


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


def _text(env: str, name: str) -> Path:
    """The text file $env names (the noxfile points it at ../shared/data where that exists), else the small text the
    repository carries (tests/data/<name>, written for these tests), so the real-model tests run on any clone."""
    value = os.environ.get(env)
    path = Path(value) if value else DATA / name
    if not path.is_file():
        pytest.fail(f"{env}={value}: no such file")
    return path


@pytest.fixture(scope="session")
def eval_text() -> Path:
    return _text("DN_EVAL_TEXT", "eval-small.txt")


@pytest.fixture(scope="session")
def calib_text() -> Path:
    return _text("DN_CALIB_TEXT", "calib-small.txt")


@pytest.fixture
def prompt_tokens(tokenizer) -> np.ndarray:
    text = "The quick brown fox jumps over the lazy dog because it wanted to see what was on the other side."
    return np.array([tokenizer.encode(text)])
