"""The array ops dn's backend-neutral layers (dn/sparse_mlp.py) are written over, on torch.

dn_mlx/ops.py has the same functions; a test checks the two modules match, name for name."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dn import sparse as ref
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
    return next(t for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point())


def silu(x: torch.Tensor) -> torch.Tensor:
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


def packed(a: np.ndarray) -> np.ndarray:
    """dn's packed int4 nibbles uint8 [m, k/2], as held on this backend."""
    return np.ascontiguousarray(a)


def int4_matmul(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x [T, k] float32 @ W.T for W [m, k] held packed (q uint8 [m, k/2], scales s [m, k/GROUP]) -> [T, m].
    Few tokens: per-group partial dots of the raw nibbles, scaled afterwards, so W is never scaled or
    interleaved in memory; many tokens: unpack once and matmul."""
    if x.shape[0] > 16:
        return x @ _unpack_int4(q, s).T
    m, g, t = q.shape[0], s.shape[1], x.shape[0]
    xe, xo = (x[:, i::2].reshape(t, g, ref.GROUP // 2) for i in (0, 1))          # even / odd columns
    lo, hi = ((q & 15).float(), (q >> 4).float())                                 # [m, k/2] values + 8
    p = (torch.einsum("mgk,tgk->tmg", lo.view(m, g, -1), xe)
         + torch.einsum("mgk,tgk->tmg", hi.view(m, g, -1), xo))                   # [T, m, g]
    return ((p - 8 * x.view(t, g, ref.GROUP).sum(-1)[:, None]) * s).sum(-1)


def _unpack_int4(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Packed nibbles uint8 [m, d/2], scales [m, d/GROUP] -> float32 [m, d] (dn.sparse.dequantize_int4)."""
    m = q.shape[0]
    w = torch.stack([(q & 15), (q >> 4)], dim=-1).view(m, -1).float() - 8
    return (w.view(m, -1, ref.GROUP) * s[..., None]).view(m, -1)


def fused_available(x: torch.Tensor) -> bool:
    """The fused sparse kernel runs here: Triton on CUDA/ROCm."""
    from dn_torch import sparse

    return x.is_cuda and sparse.triton is not None


def fused_step(x, bundled, idx, c, y0):
    """One token through the fused Triton kernel (dn_torch/sparse.py)."""
    from dn_torch import sparse

    return sparse._fused_step(x, bundled, idx.reshape(-1), c, y0)
