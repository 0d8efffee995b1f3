"""The contract both backend packages satisfy, and the one place a backend is chosen.

`dn_mlx` and `dn_torch` expose the same module-level functions; tests check them against `Backend`.
All arrays crossing the contract are numpy, so callers (generate, eval, parity) are backend-free.
"""

from __future__ import annotations

import importlib
import platform
import sys
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dn.errors import DnError
from dn.spec import ModelSpec

BACKENDS = ("mlx", "torch")
DTYPES = ("float32", "bfloat16")


class Backend(Protocol):
    NAME: str

    def is_available(self) -> bool: ...

    def device_name(self) -> str: ...

    def load(self, model_dir: Path, spec: ModelSpec, dtype: str = "float32") -> Any: ...

    def make_cache(self, model: Any) -> Any: ...

    def logits(self, model: Any, tokens: np.ndarray, cache: Any = None, last_only: bool = False) -> np.ndarray:
        """tokens [B, L] int -> float32 logits [B, L, V] ([B, 1, V] if last_only); extends cache."""

    def token_nll(self, model: Any, tokens: np.ndarray) -> np.ndarray:
        """tokens [B, L] -> float64 NLL of tokens[:, 1:] given their prefixes, [B, L-1]."""

    def hidden_states(self, model: Any, tokens: np.ndarray) -> list[np.ndarray]:
        """tokens [1, L] -> [embeddings, after layer 0, ..., after layer N-1], each float32 [L, D]."""

    def resident_weight_bytes(self, model: Any) -> int: ...

    def peak_memory_bytes(self) -> int: ...

    def reset_peak_memory(self) -> None: ...

    def free(self, model: Any) -> None: ...


def get(name: str) -> Backend:
    if name not in BACKENDS:
        raise DnError(f"unknown backend {name!r} (choose from auto, {', '.join(BACKENDS)})")
    try:
        module = importlib.import_module(f"dn_{name}")
    except ImportError as e:
        raise DnError(f"backend {name} is not installed ({e.msg})") from None
    if not module.is_available():
        raise DnError(f"backend {name} is installed but cannot run here")
    return module


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def auto() -> str:
    """MLX on Apple silicon; torch on CUDA/ROCm; otherwise torch, the faster CPU path
    (benchmarks/bench_backends.py measures it)."""
    if sys.platform == "darwin" and platform.machine() == "arm64" and _installed("mlx"):
        return "mlx"
    if _installed("torch"):
        return "torch"
    if _installed("mlx"):
        return "mlx"
    raise DnError("no backend installed: pip install 'dreamnova[cpu]' (or [mlx] on a Mac)")


def resolve(name: str) -> Backend:
    return get(auto() if name == "auto" else name)
