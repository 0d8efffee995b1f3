"""The sparse MLP on MLX: dn/runtime/sparse_mlp.py's layer bound to mlx.nn.Module, the bundle a loader lays a
dense MLP out in, and how calibration taps a model. Paths: `gather` (take of bundled rows, three contractions),
`masked` for many tokens at once, and `fused` (the Metal kernels, dn_mlx/kernels.py; Apple GPU only)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx import nn

from dn.runtime import sparse_mlp
from dn_mlx import ops


class SparseMLP(sparse_mlp.SparseMLP, nn.Module):
    """Drop-in for a gated MLP executing one layer of the spec, or a router alone (sparse_mlp.routers); its arrays
    are the Module's."""

    ops = ops
    __call__ = sparse_mlp.SparseMLP.call


def lay_out_bundled(mlp, dtype, device=None) -> dict[str, mx.array]:
    """For a loader: a dense MLP's gate, up and down weights (as loaded, evaluated or not) become views of one
    [n, 3, d] array at dtype, the bundle SparseMLP computes on; evaluating them builds it (the weights they
    were are freed as it is), and the sparse MLP then takes it as it is: no second copy of a layer's weights.
    Returns {"gate_proj.weight": view, ...}, as dn_torch's; device: MLX's default."""
    proj = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    b = mx.contiguous(mx.stack([proj[0].weight, proj[1].weight, proj[2].weight.T], axis=1)).astype(dtype)
    views = (b[:, 0], b[:, 1], b[:, 2].T)
    for p, v in zip(proj, views):
        p.weight = v
    object.__setattr__(mlp, sparse_mlp.LAID_OUT, (b, views))  # a plain attribute: the weights already hold its bytes
    return dict(zip(("gate_proj.weight", "up_proj.weight", "down_proj.weight"), views))


class _Tap(nn.Module):
    """An MLP that passes its inputs to record: MLX has no hooks."""

    def __init__(self, inner, record):
        super().__init__()
        self.inner, self._record = inner, record

    def __call__(self, x):
        self._record(x)
        return self.inner(x)


def _tap(layer, record):
    inner, layer.mlp = layer.mlp, _Tap(layer.mlp, record)
    return lambda: setattr(layer, "mlp", inner)


def routers(model_dir, spec, dtype) -> list[SparseMLP]:
    return sparse_mlp.routers(SparseMLP, model_dir, spec, mx.zeros((), dtype))


def make_sparse_mlp(bundled: np.ndarray, layer, dtype: str = "float32", device: str | None = None) -> SparseMLP:
    """On MLX's default device."""
    return SparseMLP(mx.array(np.asarray(bundled, np.float32)).astype(ops.DTYPES[dtype]), layer)


_bound = sparse_mlp.bind(SparseMLP, _tap, lambda model, tokens: mx.eval(model(mx.array(tokens))))
attach, install_sparse = _bound.attach, _bound.install_sparse
mlp_weights, collect_mlp_inputs = _bound.mlp_weights, _bound.collect_mlp_inputs
