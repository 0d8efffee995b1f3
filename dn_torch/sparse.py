"""The sparse MLP on torch: dn/runtime/sparse_mlp.py's layer bound to nn.Module, the fused Triton kernel, and the
framework I/O calibration needs. Paths: `gather` (index_select of bundled rows, three small contractions;
any device), `fused` (one Triton kernel: gather, gate/up dots, silu*up, prior correction and down
accumulation; CUDA, one token), `masked` for many tokens at once (prefill/eval).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from dn.formats import sparse as ref
from dn.runtime import sparse_mlp
from dn_torch import ops

try:  # Triton only where a GPU backend is installed
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs
    triton = None


class SparseMLP(sparse_mlp.SparseMLP, nn.Module):
    """Drop-in for a SwiGLU MLP executing one layer of the spec (dn.runtime.sparse_mlp.SparseMLP has the logic)."""

    ops = ops

    def __init__(self, mlp, layer: ref.LayerSparse, path: str = "auto"):
        nn.Module.__init__(self)
        self.setup(*_weights(mlp), layer, path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.call(x)


def _weights(mlp):
    """(bundled, None) for a dense MLP or a bundled tensor; (None, projections) for other formats."""
    if isinstance(mlp, torch.Tensor):
        return mlp.contiguous(), None
    if isinstance(mlp, SparseMLP):  # a split layer's bundle is decoded (its next spec splits it again)
        return (mlp.bundle(), None) if mlp.bundled is not None or mlp.split else (
            None, (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    proj = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    if all(type(p) is nn.Linear for p in proj):
        b = getattr(mlp, "dn_bundled", None)  # laid out by the loader: the weights are its views (lay_out_bundled)
        if b is not None and [p.weight.data_ptr() for p in proj] == [b[:, j].data_ptr() for j in range(3)]:
            return b, None
        w = [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight.T]
        return torch.stack([t.detach() for t in w], dim=1).contiguous(), None
    return None, proj


def lay_out_bundled(mlp, dtype: torch.dtype, device=None) -> dict[str, torch.Tensor]:
    """For a loader: a dense MLP's gate, up and down weights (on meta) become views of one [n, 3, d] block at
    dtype on device, the bundle SparseMLP computes on; returns {"gate_proj.weight": view, ...} for the loader
    to read each stored projection into. The sparse MLP then takes the block as it is: no second copy of a
    layer's weights."""
    n, d = mlp.gate_proj.weight.shape
    b = torch.empty(n, 3, d, dtype=dtype, device=device)
    views = {"gate_proj.weight": b[:, 0], "up_proj.weight": b[:, 1], "down_proj.weight": b[:, 2].T}
    for name, v in views.items():
        getattr(mlp, name.split(".")[0]).weight = nn.Parameter(v, requires_grad=False)
    mlp.dn_bundled = b  # a plain attribute, not a buffer: the weights already hold its bytes
    return views


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def mlp_weights(model, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Layer i's (gate [n, d], up [n, d], down [d, n]) as float32 numpy (dense or bundled layers)."""
    mlp = model.model.layers[i].mlp
    if isinstance(mlp, SparseMLP) and (mlp.bundled is not None or mlp.split):
        b = _np(mlp.bundle())
        return b[:, 0], b[:, 1], b[:, 2].T.copy()
    return _np(mlp.gate_proj.weight), _np(mlp.up_proj.weight), _np(mlp.down_proj.weight)


def collect_mlp_inputs(model, token_batches: list[np.ndarray]) -> list[np.ndarray]:
    """Run the model over token batches [B, L]; return each layer's MLP inputs, float32 [sum B*L, d]."""
    layers = model.model.layers
    got = [[] for _ in layers]
    hooks = [layer.mlp.register_forward_pre_hook(
        lambda _m, args, i=i: got[i].append(_np(args[0].reshape(-1, args[0].shape[-1]))))
        for i, layer in enumerate(layers)]
    try:
        dev = next(model.parameters()).device
        with torch.inference_mode():
            for tokens in token_batches:
                model(torch.as_tensor(np.asarray(tokens), device=dev), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [np.concatenate(g) for g in got]


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


def _fused_step(x: torch.Tensor, bundled: torch.Tensor, idx: torch.Tensor, c: torch.Tensor,
               y0: torch.Tensor, block_k: int = 16, block_d: int = 256, act: str = "silu",
               split: int = 0) -> torch.Tensor:
    """One token: x [1, d], bundled [n, 3, d], idx [k] -> y [1, d] (Triton, fp32 accumulation); act: silu or
    gelu_tanh (dn.formats.sparse.ACTS). split 0: one kernel; split s >= 1: two (kept activations, then the down rows
    with
    each column's sum split s ways), fewer atomics for one more launch (scripts/gpu_check.py times both)."""
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


def attach(model, model_dir: Path, spec) -> None:
    """Replace every layer's MLP by a SparseMLP executing spec.sparse (validated against the model)."""
    sparse_mlp.install(model, ref.load_for_model(model_dir, spec, lazy=True), SparseMLP)  # a layer at a time


class RouterOnly(sparse_mlp.SparseMLP, nn.Module):
    """A layer's router and prior without its neurons (residency holds those: dn/runtime/residency.py)."""

    ops = ops

    def __init__(self, layer: ref.LayerSparse, like: torch.Tensor):
        nn.Module.__init__(self)
        self.setup(None, None, layer, like=like)


def routers(model_dir: Path, spec, dtype: torch.dtype) -> list[RouterOnly]:
    from dn_torch.model import _device

    like = torch.zeros((), dtype=dtype, device=_device())
    return [RouterOnly(layer, like) for layer in ref.load_for_model(model_dir, spec, lazy=True).layers]


def install(model, s: ref.SparseSpec) -> None:
    """Patch the MLPs with an in-memory SparseSpec (re-installing over SparseMLPs reuses their weights)."""
    sparse_mlp.install(model, s, SparseMLP)


def make_mlp(bundled: np.ndarray, layer: ref.LayerSparse, dtype: str = "float32", device: str | None = None):
    """A standalone SparseMLP over bundled weights [n, 3, d] (tests, benchmarks)."""
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    return SparseMLP(torch.as_tensor(bundled, device=dev).to(dt), layer)
