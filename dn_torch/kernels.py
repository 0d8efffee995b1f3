"""The sparse MLP's kernels on torch and where each runs: dn/formats/csrc/sparse.c over bundles and
dn/formats/csrc/planes.c over split planes (CPU tensors, through ctypes), and the fused Triton kernel (CUDA/ROCm).
dn_torch/ops.py offers them as its capabilities (dn.runtime.backend.CAPABILITIES): native_sparse, native_planes,
fused_sparse. The fused Triton step: gather, gate/up dots, act*up, prior correction and down accumulation in one
kernel, one token.
"""

from __future__ import annotations

import torch

from dn.core import activations
from dn.formats import native, planes
from dn.formats import sparse as ref

try:  # Triton only where a GPU backend is installed
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs
    triton = None

_PER_THREAD = 1 << 21
_NATIVE = {torch.bfloat16: lambda lib: lib.dn_sparse_kept_bf16, torch.float32: lambda lib: lib.dn_sparse_kept_f32}


def threads(weights: int) -> int:
    """OpenMP threads for a step over up to `weights` weights: torch's count, but one per _PER_THREAD at most
    (a small layer's step is over before a second thread pool, beside torch's, would pay for waking)."""
    return max(1, min(torch.get_num_threads(), weights // _PER_THREAD))


# ---- native_sparse: dn/formats/csrc/sparse.c ----------------------------------------------------------------------

def native_available(x: torch.Tensor, bundled: torch.Tensor) -> bool:
    """CPU tensors, bf16 or float32, a compiler (dn.formats.native)."""
    return (x.device.type == "cpu" and bundled.dtype in _NATIVE and x.dtype == bundled.dtype
            and ref.native() is not None)


def native_step(x: torch.Tensor, bundled: torch.Tensor, mask: torch.Tensor, c: torch.Tensor, y0: torch.Tensor,
                name: str) -> torch.Tensor:
    """The kept neurons read from their bundles in place, each once for every token keeping it."""
    t, d = x.shape
    x, mask = x.contiguous(), mask.contiguous()
    y = torch.empty(t, d, dtype=torch.float32)
    y.copy_(y0)  # a fresh buffer: the kernel accumulates into it
    _NATIVE[bundled.dtype](ref.native())(native.ptr(x), native.ptr(bundled), native.ptr(mask), t, bundled.shape[0], d,
                                      native.ptr(c), native.ptr(y), activations.kind(name),
                                      threads(t * bundled[0].numel()))
    return y.to(x.dtype)


# ---- native_planes: dn/formats/csrc/planes.c ----------------------------------------------------------------------

def planes_native(x: torch.Tensor) -> bool:
    """CPU, bf16, a compiler (dn.formats.native)."""
    return x.device.type == "cpu" and x.dtype == torch.bfloat16 and planes.native() is not None


def planes_held(held: dict) -> dict:
    if held["sketch"].device.type == "cpu" and planes.native() is not None:
        return held | {"mat": planes.mat(held)}
    return held


def planes_step(x: torch.Tensor, mats: tuple, thresh: torch.Tensor, c: torch.Tensor, y0: torch.Tensor, name: str,
                sketch: bool, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    t, d = x.shape
    y = torch.empty(t, d, dtype=torch.float32)
    y.copy_(y0)
    m = torch.zeros(t, thresh.shape[0], dtype=torch.uint8) if mask is None else mask.to(torch.uint8).contiguous()
    planes.step_native(planes.native(), x.contiguous().view(torch.int16), mats, thresh, c, y, m,
                       activations.kind(name), sketch, mask is None, threads(t * 3 * thresh.shape[0] * d))
    return y.to(x.dtype), m.bool()


def planes_estimate(x: torch.Tensor, gate: dict, up: dict, name: str) -> torch.Tensor:
    est = torch.empty(x.shape[0], gate["sketch"].shape[0], dtype=torch.float32)
    planes.estimate_native(planes.native(), x.contiguous().view(torch.int16), gate["mat"], up["mat"],
                           activations.kind(name), est, threads(x.shape[0] * 2 * gate["sketch"].numel()))
    return est


def planes_sketch(h: torch.Tensor, down: dict) -> torch.Tensor:
    y = torch.zeros(h.shape[0], down["sketch"].shape[1] * 4 // 3, dtype=torch.float32)
    planes.sketch_native(planes.native(), h.float().contiguous(), down["mat"], y, threads(down["sketch"].numel()))
    return y


# ---- fused_sparse: Triton --------------------------------------------------------------------------------------

def fused_available(x: torch.Tensor, act: str = "silu") -> bool:
    """Triton on CUDA/ROCm (silu and gelu_tanh)."""
    return x.is_cuda and triton is not None


def fused_step(x, bundled, idx, c, y0, act: str = "silu"):
    return triton_step(x, bundled, idx.reshape(-1), c, y0, act=act)


if triton is not None:
    @triton.jit
    def _kept_act(x_ptr, w_ptr, idx_ptr, c_ptr, ks, live, D: tl.constexpr, BLOCK_D: tl.constexpr,
                  GELU: tl.constexpr):
        """act(g)*u - c of kept neurons ks (0 where not live): their gate/up rows dotted with x. act: silu, or
        GELU's tanh approximation (tanh through exp: the interpreter and every backend have it)."""
        rows = tl.load(idx_ptr + ks, mask=live, other=0).to(tl.int64) * (3 * D)
        g = tl.zeros(ks.shape, tl.float32)
        u = tl.zeros(ks.shape, tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            dm = ds < D  # D need not be a multiple of BLOCK_D
            xv = tl.load(x_ptr + ds, mask=dm, other=0.0).to(tl.float32)
            off = rows[:, None] + ds[None, :]
            m = live[:, None] & dm[None, :]
            wg = tl.load(w_ptr + off, mask=m, other=0.0).to(tl.float32)
            wu = tl.load(w_ptr + off + D, mask=m, other=0.0).to(tl.float32)
            g += tl.sum(wg * xv[None, :], axis=1)
            u += tl.sum(wu * xv[None, :], axis=1)
        c = tl.load(c_ptr + tl.load(idx_ptr + ks, mask=live, other=0), mask=live, other=0.0).to(tl.float32)
        if GELU:
            z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            a = 0.5 * g * (2.0 - 2.0 / (tl.exp(2.0 * z) + 1.0))  # 0.5 g (1 + tanh z)
        else:
            a = g / (1.0 + tl.exp(-g))
        return tl.where(live, a * u - c, 0.0)

    @triton.jit
    def _fused_kernel(x_ptr, w_ptr, idx_ptr, c_ptr, y_ptr, K, D: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, GELU: tl.constexpr):
        """One program: BLOCK_K kept neurons. Pass 1 dots their gate/up rows with x; pass 2 adds
        (act(g)*u - c) times their down rows into y (fp32 atomics across programs: d per program)."""
        ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        live = ks < K
        h = _kept_act(x_ptr, w_ptr, idx_ptr, c_ptr, ks, live, D, BLOCK_D, GELU)
        rows = tl.load(idx_ptr + ks, mask=live, other=0).to(tl.int64) * (3 * D)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            dm = ds < D
            off = rows[:, None] + 2 * D + ds[None, :]
            wd = tl.load(w_ptr + off, mask=live[:, None] & dm[None, :], other=0.0).to(tl.float32)
            tl.atomic_add(y_ptr + ds, tl.sum(wd * h[:, None], axis=0), mask=dm)

    @triton.jit
    def _act_kernel(x_ptr, w_ptr, idx_ptr, c_ptr, h_ptr, K, D: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_D: tl.constexpr, GELU: tl.constexpr):
        """Split design, pass 1: h[k] = act(g)*u - c of the kept neurons, float32."""
        ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        live = ks < K
        tl.store(h_ptr + ks, _kept_act(x_ptr, w_ptr, idx_ptr, c_ptr, ks, live, D, BLOCK_D, GELU), mask=live)

    @triton.jit
    def _down_kernel(w_ptr, idx_ptr, h_ptr, y_ptr, K, D: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_D: tl.constexpr, SPLIT: tl.constexpr):
        """Split design, pass 2: program (j, s) owns columns j*BLOCK_D.. of y and the s-th of SPLIT shares of the
        kept neurons: SPLIT atomic adds per column instead of one per neuron block."""
        ds = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
        dm = ds < D
        share = tl.cdiv(tl.cdiv(K, SPLIT), BLOCK_K) * BLOCK_K
        k_lo = tl.program_id(1) * share
        k_hi = tl.minimum(k_lo + share, K)
        acc = tl.zeros([BLOCK_D], tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            live = ks < k_hi
            rows = tl.load(idx_ptr + ks, mask=live, other=0).to(tl.int64) * (3 * D)
            h = tl.load(h_ptr + ks, mask=live, other=0.0)
            wd = tl.load(w_ptr + rows[:, None] + 2 * D + ds[None, :], mask=live[:, None] & dm[None, :],
                         other=0.0).to(tl.float32)
            acc += tl.sum(wd * h[:, None], axis=0)
        tl.atomic_add(y_ptr + ds, acc, mask=dm)


def triton_step(x: torch.Tensor, bundled: torch.Tensor, idx: torch.Tensor, c: torch.Tensor,
                y0: torch.Tensor, block_k: int = 16, block_d: int = 256, act: str = "silu",
                split: int = 0) -> torch.Tensor:
    """One token: x [1, d], bundled [n, 3, d], idx [k] -> y [1, d] (Triton, fp32 accumulation); act: silu or
    gelu_tanh. split 0: one kernel; split s >= 1: two (kept activations, then the down rows with each column's sum
    split s ways), fewer atomics for one more launch (scripts/gpu_check.py times both)."""
    d, k = x.shape[-1], idx.numel()
    block_d = min(block_d, triton.next_power_of_2(d))  # any d: the kernel masks the last block
    y = y0.float().clone()
    xf, idx = x.reshape(-1).contiguous(), idx.contiguous()
    gelu = act == "gelu_tanh"
    if split == 0:
        _fused_kernel[(triton.cdiv(k, block_k),)](xf, bundled, idx, c, y, k, D=d, BLOCK_K=block_k, BLOCK_D=block_d,
                                                  GELU=gelu)
    else:
        h = torch.empty(k, dtype=torch.float32, device=x.device)
        _act_kernel[(triton.cdiv(k, block_k),)](xf, bundled, idx, c, h, k, D=d, BLOCK_K=block_k, BLOCK_D=block_d,
                                                GELU=gelu)
        _down_kernel[(triton.cdiv(d, block_d), split)](bundled, idx, h, y, k, D=d, BLOCK_K=block_k, BLOCK_D=block_d,
                                                       SPLIT=split)
    return y.to(x.dtype).view(1, d)
