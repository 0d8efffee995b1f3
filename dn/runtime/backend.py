"""The contracts both backend packages satisfy, and the one place a backend is chosen.

`dn_mlx` and `dn_torch` expose the same module-level functions (`Backend`); all arrays crossing it are numpy, so
callers (generate, eval, parity) are backend-free. Each backend's `ops` module is the array ops dn's backend-neutral
layers (dn/runtime/sparse_mlp.py, dn/runtime/residency) are written over (`Ops`), plus the optional kernel groups its
CAPABILITIES declare (`CAPABILITIES` here: a group's functions exist exactly when it is declared).
tests/test_protocol.py checks names and signatures.
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
    ops: Any  # the backend's Ops module

    def is_available(self) -> bool: ...

    def device_name(self) -> str: ...

    def load(self, model_dir: Path, spec: ModelSpec, dtype: str = "float32", residency: Any = None,
             stage: Any = None) -> Any:
        """residency: a dn.runtime.residency.Runtime; the MLPs are then held under its plan, not read from the
        folder. stage: a dn.runtime.pipeline.Stage; only its layers are read (the backend's pipeline.cut)."""

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

    # The backend's `pipeline` module (dn.runtime.pipeline has the logic): connect(timeout_s) -> group; rank(group),
    # size(group), close(group); send(group, x, dst) -> bytes; recv(group, shape, dtype, src); cut(model, stage) before
    # the loader reads; forward(model, stage, x, cache, last_only).
    pipeline: Any

    # The backend's `resident` module: what dn.runtime.residency needs beyond the backend's ops (dense blocks
    # are laid out by dn): layout(spec, dtype) -> (kind, key) and block_arrays(slices, proj, spec, dtype) of an
    # affine block; join(arrays, info) -> part; matmul(x, w, s, b, info); settle(y); concat(ys); ResidentModule
    # (the MLP's module, `resident` set by Runtime.install); ops (the backend's ops module).
    resident: Any

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


class Ops(Protocol):
    """`dn_<backend>.ops`: arrays are the backend's own (torch tensors, mlx arrays); `like` gives a new array its
    device (and, where said, its dtype)."""

    CAPABILITIES: frozenset[str]  # the optional kernel groups this backend has (keys of CAPABILITIES below)
    DTYPES: dict  # dtype names (dn's for floats, safetensors' for the rest) -> the framework's: the backend's one table
    CPU_DTYPES: dict  # format name -> the compute dtype its fast CPU kernels need (`--dtype auto` on a CPU)

    def device(self) -> Any:
        """The device a model is placed on by default."""

    def hold(self, module: Any, name: str, array: Any) -> None:
        """Keep an array on a module so it is listed (and moved) with the module's weights."""

    def from_numpy(self, a: np.ndarray, like: Any) -> Any:
        """numpy -> an array on like's device (dtype kept)."""

    def to_numpy(self, a: Any) -> np.ndarray: ...

    def float32(self, x: Any) -> Any: ...

    def cast(self, x: Any, like: Any) -> Any:
        """x at like's dtype."""

    def is_dense(self, module: Any) -> bool:
        """A plain dense linear projection (its weight a full matrix)."""

    def weight_like(self, module: Any) -> Any:
        """An array with the module's device and compute dtype (any weight format)."""

    def act(self, name: str, x: Any) -> Any:
        """The gated MLP's activation by dn's name (dn.core.activations)."""

    def abs(self, x: Any) -> Any: ...

    def zero_where(self, x: Any, mask: Any) -> Any:
        """x with 0 where mask is True."""

    def topk_mask(self, s: Any, k: int) -> Any:
        """scores [T, n] -> bool [T, n], True at each row's k largest."""

    def kept_indices(self, mask: Any) -> Any:
        """bool [T, n] with the same count per row -> sorted indices [T, k]."""

    def take(self, a: Any, idx: Any) -> Any:
        """a[idx] along the first axis."""

    def take_rows(self, w: Any, idx: Any) -> Any:
        """w [n, ...], idx [T, k] -> [T, k, ...]."""

    def rowdot(self, w: Any, x: Any) -> Any:
        """w [T, k, d], x [T, d] -> [T, k]."""

    def rowsum(self, h: Any, w: Any) -> Any:
        """h [T, k], w [T, k, d] -> [T, d]."""

    def scatter(self, h: Any, idx: Any, n: int) -> Any:
        """h [T, k] at columns idx [T, k] of a zero [T, n]."""

    def broadcast_to(self, a: Any, shape: tuple) -> Any: ...

    def rows(self, module: Any, idx: Any) -> Any:
        """Rows idx of a projection's weight [out, in], whatever its format, at the compute dtype."""

    def int4_linear(self, packed: np.ndarray, scales: np.ndarray, like: Any) -> Any:
        """dn's packed int4 sketch (nibbles uint8 [m, k/2] low first, float32 scales [m, k/GROUP], value q - 8) as
        the backend's affine-quantized linear (the nibbles read as uint32 are the 4-bit layout, the bias -8 * scale),
        scales and biases at like's dtype."""

    def int4_matmul(self, x: Any, lin: Any) -> Any:
        """x [T, k] @ W.T through an int4_linear, in its compute dtype -> [T, m] float32."""

    def bits16(self, x: Any) -> np.ndarray:
        """A 16-bit array's bits, uint16 numpy."""

    def planes_decode(self, held: dict, k: int, out: Any = None, exact: bool = True) -> Any:
        """A router-planes matrix (held: its dn.formats.planes.FIELDS arrays) as bf16 [m, k]: its exact weights or
        (exact False) its sketch's w^, into out (a scratch()) where the backend writes in place."""

    def scratch(self, rows: int, cols: int) -> Any:
        """One bf16 [rows, cols] buffer per shape for the process that split layers decode into in turn, or None
        where arrays are immutable (each decode then makes its own)."""

    def stack(self, arrays: list, axis: int) -> Any:
        """A new array (no autograd history)."""

    def contiguous(self, x: Any) -> Any:
        """x row-contiguous (a copy only where it is not): the C kernels take raw pointers."""

    def is_bfloat16(self, x: Any) -> bool: ...


class NativeSparse(Protocol):
    """Capability "native_sparse": dn/formats/csrc/sparse.c over bundled weights, any count of kept neurons per
    token, each bundle read once for the tokens keeping it."""

    def native_available(self, x: Any, bundled: Any) -> bool:
        """The C kernel runs on these arrays (host memory, its dtypes, a compiler)."""

    def native_step(self, x: Any, bundled: Any, mask: Any, c: Any, y0: Any, name: str) -> Any:
        """x [T, d], bundled [n, 3, d], mask bool [T, n] -> y [T, d] (float32 accumulation, x's dtype)."""


class NativePlanes(Protocol):
    """Capability "native_planes": dn/formats/csrc/planes.c over a router-planes layer's split weights."""

    def planes_native(self, x: Any) -> bool:
        """The split-planes C kernels take these tokens (host memory, bf16, a compiler)."""

    def planes_held(self, held: dict) -> dict:
        """A split matrix's held arrays + "mat", the C kernels' struct over them, where those run."""

    def planes_step(self, x: Any, mats: tuple, thresh: Any, c: Any, y0: Any, name: str, sketch: bool,
                    mask: Any = None) -> tuple[Any, Any]:
        """x [T <= 4, d] bf16 -> (y [T, d], mask bool [T, n]): routing, kept neurons and prior in one pass (mats:
        the (gate, up, down) structs); mask given: that selection replayed."""

    def planes_estimate(self, x: Any, gate: dict, up: dict, name: str) -> Any:
        """x bf16 [T <= 4, d] -> the router's act(g^) * u^, [T, n] float32."""

    def planes_sketch(self, h: Any, down: dict) -> Any:
        """h float32 [T <= 4, n] -> h @ the down matrix's sketch, [T, d] float32."""


class FusedSparse(Protocol):
    """Capability "fused_sparse": a GPU kernel over bundled weights and the same kept count per token."""

    def fused_available(self, x: Any, act: str = "silu") -> bool:
        """The fused kernel runs on these arrays with this activation."""

    def fused_step(self, x: Any, bundled: Any, idx: Any, c: Any, y0: Any, act: str = "silu") -> Any:
        """x [T, d], bundled [n, 3, d], idx [T, k] sorted kept neurons -> y [T, d] (where a kernel takes one token:
        T = 1)."""


# the optional kernel groups an ops module may declare in its CAPABILITIES, and the functions each brings
CAPABILITIES = {"native_sparse": NativeSparse, "native_planes": NativePlanes, "fused_sparse": FusedSparse}


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
