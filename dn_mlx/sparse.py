"""The sparse MLP on MLX: dn/runtime/sparse_mlp.py's layer bound to mlx.nn.Module, the Metal kernels, and the
framework I/O calibration needs. Paths: `gather` (take of bundled rows, three contractions), `masked` for
many tokens at once, and `fused` (metal/sparse_hidden.metal + metal/sparse_down.metal through
mx.fast.metal_kernel; Apple GPU only, so it is not exercised on Linux).
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx import nn

from dn.formats import sparse as ref
from dn.runtime import sparse_mlp
from dn_mlx import ops

_DT = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


class SparseMLP(sparse_mlp.SparseMLP, nn.Module):
    """Drop-in for a SwiGLU MLP executing one layer of the spec (dn.runtime.sparse_mlp.SparseMLP has the logic)."""

    ops = ops

    def __init__(self, mlp, layer: ref.LayerSparse, path: str = "auto"):
        nn.Module.__init__(self)
        self.setup(*_weights(mlp), layer, path)

    def __call__(self, x: mx.array) -> mx.array:
        return self.call(x)


def _weights(mlp):
    """(bundled, None) for a dense MLP or a bundled array; (None, projections) for other formats."""
    if isinstance(mlp, mx.array):
        return mlp, None
    if isinstance(mlp, SparseMLP):  # a split layer's bundle is decoded (its next spec splits it again)
        return (mlp.bundle(), None) if mlp.bundled is not None or mlp.split else (
            None, (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    proj = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    if all(type(p) is nn.Linear for p in proj):
        b, views = mlp.__dict__.get("_dn_bundled", (None, ()))  # laid out by the loader (lay_out_bundled)
        if b is not None and all(p.weight is v for p, v in zip(proj, views)):
            return b, None
        bundled = mx.stack([mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight.T], axis=1)
        return mx.contiguous(bundled), None
    return None, proj


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
    object.__setattr__(mlp, "_dn_bundled", (b, views))  # a plain attribute: the weights already hold its bytes
    return dict(zip(("gate_proj.weight", "up_proj.weight", "down_proj.weight"), views))


def _np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def mlp_weights(model, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Layer i's (gate [n, d], up [n, d], down [d, n]) as float32 numpy (dense or bundled layers)."""
    mlp = model.model.layers[i].mlp
    if isinstance(mlp, SparseMLP) and (mlp.bundled is not None or mlp.split):
        b = _np(mlp.bundle())
        return b[:, 0], b[:, 1], b[:, 2].T.copy()
    return _np(mlp.gate_proj.weight), _np(mlp.up_proj.weight), _np(mlp.down_proj.weight)


class _Tap(nn.Module):
    """Wraps an MLP and records its inputs."""

    def __init__(self, inner, sink: list):
        super().__init__()
        self.inner, self._sink = inner, sink

    def __call__(self, x):
        self._sink.append(_np(x.reshape(-1, x.shape[-1])))
        return self.inner(x)


def collect_mlp_inputs(model, token_batches: list[np.ndarray]) -> list[np.ndarray]:
    """Run the model over token batches [B, L]; return each layer's MLP inputs, float32 [sum B*L, d]."""
    layers = model.model.layers
    got = [[] for _ in layers]
    inner = [layer.mlp for layer in layers]
    for i, layer in enumerate(layers):
        layer.mlp = _Tap(inner[i], got[i])
    try:
        for tokens in token_batches:
            mx.eval(model(mx.array(np.asarray(tokens))))
    finally:
        for i, layer in enumerate(layers):
            layer.mlp = inner[i]
    return [np.concatenate(g) for g in got]


def _source(name: str) -> str:
    return resources.files("metal").joinpath(name).read_text()


@functools.cache
def _kernel(name: str, inputs: tuple, output: str):
    return mx.fast.metal_kernel(name=f"dn_{name}", input_names=list(inputs), output_names=[output],
                                source=_source(f"{name}.metal"))


def _metal_step(x, bundled, idx, c, y0, simdgroups: int = 4):
    """Two launches: kept neurons' activations (one simdgroup each), then the down rows (one thread per
    output element)."""
    t, d = x.shape
    k = idx.shape[1]
    idx = idx.astype(mx.uint32)
    tmpl = [("T_in", bundled.dtype), ("D", d), ("K", k)]
    h = _kernel("sparse_hidden", ("x", "bundled", "idx", "c"), "h")(
        inputs=[x.astype(bundled.dtype), bundled, idx, c], template=tmpl, grid=(32 * t * k, 1, 1),
        threadgroup=(32 * simdgroups, 1, 1), output_shapes=[(t, k)], output_dtypes=[mx.float32])[0]
    y = _kernel("sparse_down", ("h", "bundled", "idx", "y0"), "y")(
        inputs=[h, bundled, idx, y0], template=tmpl, grid=(t * d, 1, 1), threadgroup=(min(256, d), 1, 1),
        output_shapes=[(t, d)], output_dtypes=[mx.float32])[0]
    return y.astype(x.dtype)


def attach(model, model_dir: Path, spec) -> None:
    """Replace every layer's MLP by a SparseMLP executing spec.sparse (validated against the model)."""
    sparse_mlp.install(model, ref.load_for_model(model_dir, spec, lazy=True), SparseMLP)  # a layer at a time


class RouterOnly(sparse_mlp.SparseMLP):
    """A layer's router and prior without its neurons (residency holds those: dn/runtime/residency.py)."""

    ops = ops

    def __init__(self, layer: ref.LayerSparse, like: mx.array):
        self.setup(None, None, layer, like=like)


def routers(model_dir: Path, spec, dtype) -> list[RouterOnly]:
    like = mx.zeros((), dtype)
    return [RouterOnly(layer, like) for layer in ref.load_for_model(model_dir, spec, lazy=True).layers]


def install(model, s: ref.SparseSpec) -> None:
    """Patch the MLPs with an in-memory SparseSpec (re-installing over SparseMLPs reuses their weights)."""
    sparse_mlp.install(model, s, SparseMLP)


def make_mlp(bundled: np.ndarray, layer: ref.LayerSparse, dtype: str = "float32", device: str | None = None):
    """A standalone SparseMLP over bundled weights [n, 3, d] (tests, benchmarks); device: MLX's default."""
    return SparseMLP(mx.array(np.asarray(bundled, np.float32)).astype(_DT[dtype]), layer)
