"""dn.runtime.backend.Ops on torch: the array ops dn's backend-neutral layers are written over, and all three
optional kernel groups (dn_torch/kernels.py)."""

from __future__ import annotations

import functools
import os

import numpy as np
import torch
from torch import nn

from dn.core.errors import DnError
from dn.formats import planes
from dn.formats import sparse as ref
from dn_torch import kernels, quant
from dn_torch.kernels import fused_available as fused_available
from dn_torch.kernels import fused_step as fused_step
from dn_torch.kernels import native_available as native_available
from dn_torch.kernels import native_step as native_step
from dn_torch.kernels import planes_estimate as planes_estimate
from dn_torch.kernels import planes_held as planes_held
from dn_torch.kernels import planes_native as planes_native
from dn_torch.kernels import planes_sketch as planes_sketch
from dn_torch.kernels import planes_step as planes_step

CAPABILITIES = frozenset({"native_sparse", "native_planes", "fused_sparse"})
# formats whose fast CPU kernels compute at a given dtype (dn_torch.quant: torch's int4/int8 packs take 16-bit x only;
# dn_torch.gguf: 8-bit x and integer dots at bfloat16, the exact float kernel at float32)
CPU_DTYPES = {"affine": "bfloat16", "gguf": "bfloat16"}
# dtype names (dn.core.tensors.File.dtype: floats by dn's name, the rest by safetensors') -> torch's: the one table
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "U32": torch.uint32,
          "I32": torch.int32, "I64": torch.int64, "U8": torch.uint8, "I8": torch.int8}
# dn's activation names (dn.core.activations) -> torch's functions
_ACTS = {"silu": nn.functional.silu, "gelu_tanh": functools.partial(nn.functional.gelu, approximate="tanh")}
_SCRATCH: dict = {}


def device() -> torch.device:
    """DN_TORCH_DEVICE, else CUDA (ROCm builds too), MPS, the CPU."""
    name = os.environ.get("DN_TORCH_DEVICE")
    if name:
        return _pinned(name)
    if torch.cuda.is_available():  # also true on ROCm builds
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _pinned(name: str) -> torch.device:
    """The device DN_TORCH_DEVICE names, checked once here (torch fails later, each way with its own traceback)."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise DnError(f"DN_TORCH_DEVICE={name}: expected cpu, cuda, cuda:N or mps")
    if dev.type == "cuda" and (dev.index or 0) >= (n := torch.cuda.device_count() if torch.cuda.is_available() else 0):
        raise DnError(f"DN_TORCH_DEVICE={name}: " + (f"this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}" if n
                      else f"this torch ({torch.__version__}) sees no CUDA or ROCm device"))
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DnError(f"DN_TORCH_DEVICE={name}: MPS is not available here")
    return dev


def hold(module: nn.Module, name: str, array: torch.Tensor) -> None:
    module.register_buffer(name, array)


def from_numpy(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.require(a, requirements=["C", "W"]), device=like.device)


def to_numpy(a: torch.Tensor) -> np.ndarray:
    return a.detach().cpu().numpy()


def float32(x: torch.Tensor) -> torch.Tensor:
    return x.float()


def cast(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.to(like.dtype)


def is_dense(module: nn.Module) -> bool:
    return type(module) is nn.Linear


def weight_like(module: nn.Module) -> torch.Tensor:
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.is_floating_point():
        return w
    # quantized: its scales may be held 16-bit under a 32-bit compute dtype
    return torch.empty(0, dtype=module.compute_dtype, device=module.scales.device)


def act(name: str, x: torch.Tensor) -> torch.Tensor:
    return _ACTS[name](x)


def abs(x: torch.Tensor) -> torch.Tensor:
    return x.abs()


def zero_where(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x.masked_fill(mask, 0)


def topk_mask(s: torch.Tensor, k: int) -> torch.Tensor:
    idx = torch.topk(s, k, dim=1, sorted=False).indices
    return torch.zeros_like(s, dtype=torch.bool).scatter_(1, idx, True)


def kept_indices(mask: torch.Tensor) -> torch.Tensor:
    return mask.nonzero()[:, 1].view(mask.shape[0], -1)


def take(a: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return a[idx]


def take_rows(w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return w.index_select(0, idx.reshape(-1)).view(*idx.shape, *w.shape[1:])


def rowdot(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("tkd,td->tk", w, x)


def rowsum(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.einsum("tk,tkd->td", h, w)


def scatter(h: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    return h.new_zeros(h.shape[0], n).scatter_(1, idx, h)


def broadcast_to(a: torch.Tensor, shape: tuple) -> torch.Tensor:
    return a.expand(*shape).clone()


def rows(module: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    return quant.rows(module, idx)  # dense, coded (its decoded weight) or quantized (those rows dequantized)


def int4_linear(packed: np.ndarray, scales: np.ndarray, like: torch.Tensor) -> nn.Module:
    """In the layout torch's int4 kernel reads where it runs (16-bit compute on CPU)."""
    m, half = packed.shape
    lin = quant.QuantizedLinear(2 * half, m, False, 4, ref.GROUP, like.dtype)
    s = from_numpy(np.asarray(scales, np.float32), like)  # a copy: the source may be a file mapping
    lin.weight = from_numpy(np.ascontiguousarray(packed).view(np.uint32), like)
    lin.scales, lin.biases = s.to(like.dtype), (-8 * s).to(like.dtype)
    lin.prepare(like.dtype)
    return lin


def int4_matmul(x: torch.Tensor, lin: nn.Module) -> torch.Tensor:
    return lin(x.to(lin.compute_dtype)).float()


def bits16(x: torch.Tensor) -> np.ndarray:
    return x.detach().contiguous().view(torch.int16).cpu().numpy().view(np.uint16)  # a copy off the device


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor on the host as numpy, in dn.core.tensors' convention: bf16, which numpy lacks, as its uint16 bits
    (and uint32 as int32); _tensor reads bf16 back from its bits."""
    if t.dtype == torch.bfloat16:
        return bits16(t)
    t = t.detach().contiguous().cpu()
    return t.view(torch.int32).numpy() if t.dtype == torch.uint32 else t.numpy()


def _tensor(a: np.ndarray) -> torch.Tensor:
    """numpy -> a host tensor sharing its memory; uint16 arrives as bf16's bits (dn.core.tensors: no dtype in
    DTYPES is stored as uint16 but bf16)."""
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if t.dtype == torch.uint16 else t


def _codes(plane: torch.Tensor, k: int) -> torch.Tensor:
    """A split plane uint8 [m, 3k/4] -> its 6-bit fields, int64 [m, k] (dn.formats.planes' packing)."""
    m = plane.shape[0]
    g = torch.nn.functional.pad(plane.view(m, k // 8, 6), (0, 2)).contiguous().view(torch.int64)  # [m, k/8, 1]
    return ((g >> torch.arange(0, 48, 6, device=plane.device)) & 63).reshape(m, k)


def planes_decode(held: dict, k: int, out: torch.Tensor | None = None, exact: bool = True) -> torch.Tensor:
    """The C decode where it runs (held has "mat"), else torch's."""
    sk = held["sketch"]
    m = sk.shape[0]
    out = torch.empty(m, k, dtype=torch.bfloat16, device=sk.device) if out is None else out
    if "mat" in held:
        planes.join_native(planes.native(), held["mat"], m, k, out.view(torch.int16), kernels.threads(m * k), exact)
        return out
    lut = held["lut_hi" if exact else "lut_w"].long()
    bits = (lut[:64] | (lut[64:] << 8))[_codes(sk, k)]
    if exact:
        bits |= _codes(held["rest"], k)
        rows = torch.repeat_interleave(torch.arange(m, device=sk.device), torch.diff(held["esc_ptr"]))
        bits[rows, held["esc_col"].long()] = held["esc_bits"].view(torch.int16).long() & 0xFFFF
    out.view(torch.int16).copy_(bits.to(torch.int16))
    return out


def scratch(rows: int, cols: int) -> torch.Tensor:
    """On the CPU, where split layers run."""
    key = (rows, cols)
    if key not in _SCRATCH:
        _SCRATCH[key] = torch.empty(rows, cols, dtype=torch.bfloat16)
    return _SCRATCH[key]


def stack(arrays: list, axis: int) -> torch.Tensor:
    return torch.stack([a.detach() for a in arrays], axis)


def contiguous(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous()


def is_bfloat16(x: torch.Tensor) -> bool:
    return x.dtype == torch.bfloat16
