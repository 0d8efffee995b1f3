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

from dn.core.errors import DnError
from dn.model.spec import ModelSpec

BACKENDS = ("mlx", "torch")
DTYPES = ("float32", "bfloat16")


class Backend(Protocol):
    NAME: str

    def is_available(self) -> bool: ...

    def device_name(self) -> str: ...

    def load(self, model_dir: Path, spec: ModelSpec, dtype: str = "float32", residency: Any = None) -> Any:
        """residency: a dn.runtime.residency.Runtime; the MLPs are then held under its plan, not read from the
        folder."""

    def make_cache(self, model: Any, max_kv_size: int | None = None, kv_bits: int | None = None) -> Any:
        """A fresh KV cache for logits(); max_kv_size bounds it to that many tokens (a rotating or sliding-window
        cache), kv_bits quantizes it; what a backend cannot do raises DnError."""

    def logits(self, model: Any, tokens: np.ndarray, cache: Any = None, last_only: bool = False) -> np.ndarray:
        """tokens [B, L] int -> float32 logits [B, L, V] ([B, 1, V] if last_only); extends cache."""

    def token_nll(self, model: Any, tokens: np.ndarray) -> np.ndarray:
        """tokens [B, L] -> float64 NLL of tokens[:, 1:] given their prefixes, [B, L-1]."""

    def hidden_states(self, model: Any, tokens: np.ndarray) -> list[np.ndarray]:
        """tokens [1, L] -> [embeddings, after layer 0, ..., after layer N-1], each float32 [L, D]."""

    def import_model_code(self, spec: ModelSpec) -> None:
        """Import the code load() runs for spec, so a measured load (dn.runtime.memory) counts weights, not imports."""

    def memory_stats(self, reset_peak: bool = False) -> dict | None:
        """The device allocator's {kind, active_bytes, peak_kind, peak_bytes} (peak since the last reset; reset
        after reading when asked), or None where there is none (torch on the CPU): dn.runtime.memory then measures
        the process."""

    def free(self, model: Any) -> None: ...

    def resident_module(self) -> Any:
        """The backend's `resident` module: the block layout and the ops dn.runtime.residency runs on (layout_key,
        block_arrays, part_info, make_part, acts, down, settle, to_numpy, from_numpy, concat,
        install)."""

    # The sparse MLP (dn/runtime/sparse_mlp.py has its logic): what calibration, parity and benchmarks call.
    def collect_mlp_inputs(self, model: Any, token_batches: list[np.ndarray]) -> list[np.ndarray]:
        """Run the model over token batches [B, L]; each layer's MLP inputs, float32 [sum B*L, d]."""

    def mlp_weights(self, model: Any, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Layer i's (gate [n, d], up [n, d], down [d, n]) as float32 numpy."""

    def install_sparse(self, model: Any, s: Any) -> None:
        """Patch the model's MLPs with an in-memory dn.formats.sparse.SparseSpec."""

    def make_sparse_mlp(self, bundled: np.ndarray, layer: Any, dtype: str = "float32",
                        device: str | None = None) -> Any:
        """A standalone sparse MLP over bundled weights [n, 3, d] (tests, benchmarks)."""


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
