"""The sparse MLP on torch: dn/runtime/sparse_mlp.py's layer bound to nn.Module (its kernels: dn_torch/kernels.py),
the bundle a loader lays a dense MLP out in, and how calibration taps a model. Paths: `native` (the C kernel over
bundles, or over split planes; CPU), `fused` (Triton; CUDA, one token), `gather` (index_select of bundled rows, three
small contractions; any device), `masked` for many tokens at once (prefill/eval)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dn.runtime import sparse_mlp
from dn_torch import ops


class SparseMLP(sparse_mlp.SparseMLP, nn.Module):
    """Drop-in for a gated MLP executing one layer of the spec, or a router alone (sparse_mlp.routers); its tensors
    are the Module's buffers."""

    ops = ops
    forward = sparse_mlp.SparseMLP.call


def lay_out_bundled(mlp, dtype: torch.dtype, device=None) -> dict[str, torch.Tensor]:
    """For a loader: a dense MLP's gate, up and down weights (on meta) become views of one [n, 3, d] block at
    dtype on device, the bundle SparseMLP computes on; returns {"gate_proj.weight": view, ...} for the loader
    to read each stored projection into. The sparse MLP then takes the block as it is: no second copy of a
    layer's weights."""
    n, d = mlp.gate_proj.weight.shape
    b = torch.empty(n, 3, d, dtype=dtype, device=device)
    views = {"gate_proj.weight": b[:, 0], "up_proj.weight": b[:, 1], "down_proj.weight": b[:, 2].T}
    weights = []
    for name, v in views.items():
        weights.append(nn.Parameter(v, requires_grad=False))
        getattr(mlp, name.split(".")[0]).weight = weights[-1]
    object.__setattr__(mlp, sparse_mlp.LAID_OUT, (b, weights))  # not a buffer: the weights already hold its bytes
    return views


def _run(model, tokens: np.ndarray) -> None:
    with torch.inference_mode():
        model(torch.as_tensor(tokens, device=next(model.parameters()).device), use_cache=False)


def routers(model_dir, spec, dtype: torch.dtype) -> list[SparseMLP]:
    return sparse_mlp.routers(SparseMLP, model_dir, spec, torch.zeros((), dtype=dtype, device=ops.device()))


def make_sparse_mlp(bundled: np.ndarray, layer, dtype: str = "float32", device: str | None = None) -> SparseMLP:
    """On device, else CUDA where there is one, else the CPU."""
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dt = ops.DTYPES[dtype]
    return SparseMLP(torch.as_tensor(bundled, device=dev).to(dt), layer)


# calibration taps an MLP's input with a forward pre-hook
_bound = sparse_mlp.bind(
    SparseMLP, lambda layer, record: layer.mlp.register_forward_pre_hook(lambda _m, a: record(a[0])).remove, _run)
attach, install_sparse = _bound.attach, _bound.install_sparse
mlp_weights, collect_mlp_inputs = _bound.mlp_weights, _bound.collect_mlp_inputs
