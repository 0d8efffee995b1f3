"""The array ops dn's backend-neutral layers (dn/runtime/sparse_mlp.py) are written over, on torch.

dn_mlx/ops.py has the same functions; a test checks the two modules match, name for name."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dn.formats import planes
from dn.formats import sparse as ref
from dn_torch import quant


def hold(module: nn.Module, name: str, array: torch.Tensor) -> None:
    """Keep an array on a module so it moves and is listed with the module's weights."""
    module.register_buffer(name, array)


def from_numpy(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """numpy -> tensor on like's device (dtype kept)."""
    return torch.as_tensor(np.require(a, requirements=["C", "W"]), device=like.device)


def to_numpy(a: torch.Tensor) -> np.ndarray:
    return a.detach().cpu().numpy()


def float32(x: torch.Tensor) -> torch.Tensor:
    return x.float()


def cast(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.to(like.dtype)


def weight_like(module: nn.Module) -> torch.Tensor:
    """A tensor with the module's device and compute dtype (any weight format)."""
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.is_floating_point():
        return w
    # quantized: its scales may be held 16-bit under a 32-bit compute dtype
    return torch.empty(0, dtype=module.compute_dtype, device=module.scales.device)


def act(name: str, x: torch.Tensor) -> torch.Tensor:
    """The gated MLP's activation by name (dn.formats.sparse.ACTS)."""
    if name == "gelu_tanh":
        return nn.functional.gelu(x, approximate="tanh")
    return nn.functional.silu(x)


def abs(x: torch.Tensor) -> torch.Tensor:
    return x.abs()


def zero_where(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x.masked_fill(mask, 0)


def topk_mask(s: torch.Tensor, k: int) -> torch.Tensor:
    idx = torch.topk(s, k, dim=1, sorted=False).indices
    return torch.zeros_like(s, dtype=torch.bool).scatter_(1, idx, True)


def kept_indices(mask: torch.Tensor) -> torch.Tensor:
    """bool [T, n] with the same count per row -> sorted indices [T, k]."""
    return mask.nonzero()[:, 1].view(mask.shape[0], -1)


def take(a: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return a[idx]


def take_rows(w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """w [n, ...], idx [T, k] -> [T, k, ...]."""
    return w.index_select(0, idx.reshape(-1)).view(*idx.shape, *w.shape[1:])


def rowdot(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """w [T, k, d], x [T, d] -> [T, k]."""
    return torch.einsum("tkd,td->tk", w, x)


def rowsum(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """h [T, k], w [T, k, d] -> [T, d]."""
    return torch.einsum("tk,tkd->td", h, w)


def scatter(h: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    """h [T, k] at columns idx [T, k] of a zero [T, n]."""
    return h.new_zeros(h.shape[0], n).scatter_(1, idx, h)


def broadcast_to(a: torch.Tensor, shape: tuple) -> torch.Tensor:
    return a.expand(*shape).clone()


def rows(module: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """Rows idx of a projection's weight [out, in], whatever its format, at the compute dtype."""
    return quant.rows(module, idx)  # dense, coded (its decoded weight) or quantized (those rows dequantized)


def int4_linear(packed: np.ndarray, scales: np.ndarray, like: torch.Tensor) -> nn.Module:
    """dn's packed int4 sketch (nibbles uint8 [m, k/2] low first, float32 scales [m, k/GROUP], value q - 8) as an
    affine-quantized linear: the nibbles read as uint32 are the 4-bit layout, the bias is -8 * scale. Scales and
    biases at like's dtype; in the layout torch's int4 kernel reads where it runs (16-bit compute on CPU)."""
    m, half = packed.shape
    lin = quant.QuantizedLinear(2 * half, m, False, 4, ref.GROUP, like.dtype)
    s = from_numpy(np.asarray(scales, np.float32), like)  # a copy: the source may be a file mapping
    lin.weight = from_numpy(np.ascontiguousarray(packed).view(np.uint32), like)
    lin.scales, lin.biases = s.to(like.dtype), (-8 * s).to(like.dtype)
    lin.prepare(like.dtype)
    return lin


def int4_matmul(x: torch.Tensor, lin: nn.Module) -> torch.Tensor:
    """x [T, k] @ W.T through an int4_linear, in its compute dtype -> [T, m] float32."""
    return lin(x.to(lin.compute_dtype)).float()


def bits16(x: torch.Tensor) -> np.ndarray:
    """A 16-bit tensor's bits, uint16 numpy (a copy off the device)."""
    return x.detach().contiguous().view(torch.int16).cpu().numpy().view(np.uint16)


def _codes(plane: torch.Tensor, k: int) -> torch.Tensor:
    """A split plane uint8 [m, 3k/4] -> its 6-bit fields, int64 [m, k] (dn.formats.planes' packing)."""
    m = plane.shape[0]
    g = torch.nn.functional.pad(plane.view(m, k // 8, 6), (0, 2)).contiguous().view(torch.int64)  # [m, k/8, 1]
    return ((g >> torch.arange(0, 48, 6, device=plane.device)) & 63).reshape(m, k)


def planes_decode(held: dict, k: int, out: torch.Tensor | None = None, exact: bool = True) -> torch.Tensor:
    """A router-planes matrix (held: dn.formats.planes.FIELDS tensors, "mat" their C struct) as bf16 [m, k], its exact
    weights or (exact False) its sketch's w^, into out or a new tensor: the C decode where it runs, else torch."""
    sk = held["sketch"]
    m = sk.shape[0]
    out = torch.empty(m, k, dtype=torch.bfloat16, device=sk.device) if out is None else out
    if "mat" in held:
        planes.join_native(planes.native(), held["mat"], m, k, out.view(torch.int16), _threads(m * k), exact)
        return out
    lut = held["lut_hi" if exact else "lut_w"].long()
    bits = (lut[:64] | (lut[64:] << 8))[_codes(sk, k)]
    if exact:
        bits |= _codes(held["rest"], k)
        rows = torch.repeat_interleave(torch.arange(m, device=sk.device), torch.diff(held["esc_ptr"]))
        bits[rows, held["esc_col"].long()] = held["esc_bits"].view(torch.int16).long() & 0xFFFF
    out.view(torch.int16).copy_(bits.to(torch.int16))
    return out


def planes_estimate(x: torch.Tensor, gate: dict, up: dict, name: str) -> torch.Tensor:
    """x bf16 [T <= 4, d] -> the router's act(g^) * u^ [T, n] float32 through dn/formats/csrc/planes.c."""
    est = torch.empty(x.shape[0], gate["sketch"].shape[0], dtype=torch.float32)
    planes.estimate_native(planes.native(), x.contiguous().view(torch.int16), gate["mat"], up["mat"], _ACTS[name],
                           est, _threads(x.shape[0] * 2 * gate["sketch"].numel()))
    return est


def planes_sketch(h: torch.Tensor, down: dict) -> torch.Tensor:
    """h float32 [T <= 4, n] -> h @ the down matrix's sketch, [T, d] float32, through dn/formats/csrc/planes.c."""
    y = torch.zeros(h.shape[0], down["sketch"].shape[1] * 4 // 3, dtype=torch.float32)
    planes.sketch_native(planes.native(), h.float().contiguous(), down["mat"], y, _threads(down["sketch"].numel()))
    return y


def planes_held(held: dict) -> dict:
    """A split matrix's held tensors + "mat", the C kernels' struct over them, where those run (CPU)."""
    if held["sketch"].device.type == "cpu" and planes.native() is not None:
        return held | {"mat": planes.mat(held)}
    return held


_SCRATCH: dict = {}


def scratch(rows: int, cols: int) -> torch.Tensor:
    """One bf16 [rows, cols] buffer per shape for the whole process: a split layer's weights decode into it in
    turn (CPU: the split layers run there)."""
    key = (rows, cols)
    if key not in _SCRATCH:
        _SCRATCH[key] = torch.empty(rows, cols, dtype=torch.bfloat16)
    return _SCRATCH[key]


def stack(arrays: list, axis: int) -> torch.Tensor:
    return torch.stack(arrays, axis)


def is_bfloat16(x: torch.Tensor) -> bool:
    return x.dtype == torch.bfloat16


def planes_native(x: torch.Tensor) -> bool:
    """The split-planes C kernels take these tokens: CPU, bf16, a compiler (dn.formats.native)."""
    return x.device.type == "cpu" and x.dtype == torch.bfloat16 and planes.native() is not None


def planes_step(x: torch.Tensor, mats: tuple, thresh: torch.Tensor, c: torch.Tensor, y0: torch.Tensor, name: str,
                sketch: bool, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T <= 4, d] bf16 -> (y [T, d], mask bool [T, n]) through dn/formats/csrc/planes.c (mats:
    dn.formats.planes.mat structs over
    this layer's tensors); mask given: that selection replayed."""
    t, d = x.shape
    y = torch.empty(t, d, dtype=torch.float32)
    y.copy_(y0)
    m = torch.zeros(t, thresh.shape[0], dtype=torch.uint8) if mask is None else mask.to(torch.uint8).contiguous()
    planes.step_native(planes.native(), x.contiguous().view(torch.int16), mats, thresh, c, y, m, _ACTS[name],
                       sketch, mask is None, _threads(t * 3 * thresh.shape[0] * d))
    return y.to(x.dtype), m.bool()


def native_available(x: torch.Tensor, bundled: torch.Tensor) -> bool:
    """The C kernel (dn/formats/csrc/sparse.c) runs here: CPU tensors, bf16 or float32, a compiler
    (dn.formats.native)."""
    return (x.device.type == "cpu" and bundled.dtype in _NATIVE and x.dtype == bundled.dtype
            and ref.native() is not None)


def native_step(x: torch.Tensor, bundled: torch.Tensor, mask: torch.Tensor, c: torch.Tensor, y0: torch.Tensor,
                name: str) -> torch.Tensor:
    """x [T, d], bundled [n, 3, d], mask bool [T, n] (any count per token) -> y [T, d] through the C kernel: the
    kept neurons read from their bundles in place, each once for every token keeping it, float32 accumulation."""
    from dn.formats import native

    t, d = x.shape
    x, mask = x.contiguous(), mask.contiguous()
    y = torch.empty(t, d, dtype=torch.float32)
    y.copy_(y0)  # a fresh buffer: the kernel accumulates into it
    _NATIVE[bundled.dtype](ref.native())(native.ptr(x), native.ptr(bundled), native.ptr(mask), t, bundled.shape[0], d,
                                      native.ptr(c), native.ptr(y), _ACTS[name], _threads(t * bundled[0].numel()))
    return y.to(x.dtype)


def _threads(weights: int) -> int:
    """OpenMP threads for a step over up to `weights` weights: torch's count, but one per _PER_THREAD at most
    (a small layer's step is over before a second thread pool, beside torch's, would pay for waking)."""
    return max(1, min(torch.get_num_threads(), weights // _PER_THREAD))


_PER_THREAD = 1 << 21
_ACTS = {"silu": 0, "gelu_tanh": 1}  # dn/formats/csrc/sparse.c's act kinds
_NATIVE = {torch.bfloat16: lambda lib: lib.dn_sparse_kept_bf16, torch.float32: lambda lib: lib.dn_sparse_kept_f32}


def fused_available(x: torch.Tensor, act: str = "silu") -> bool:
    """The fused sparse kernel runs here: Triton on CUDA/ROCm (silu and gelu_tanh)."""
    from dn_torch import sparse

    return x.is_cuda and sparse.triton is not None


def fused_step(x, bundled, idx, c, y0, act: str = "silu"):
    """One token through the fused Triton kernel (dn_torch/sparse.py)."""
    from dn_torch import sparse

    return sparse._fused_step(x, bundled, idx.reshape(-1), c, y0, act=act)
