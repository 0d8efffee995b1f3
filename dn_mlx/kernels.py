"""The sparse MLP's Metal kernels (metal/sparse_hidden.metal, metal/sparse_down.metal through mx.fast.metal_kernel),
dn_mlx/ops.py's fused_sparse capability (dn.runtime.backend.CAPABILITIES). Apple GPU only, so not run on Linux:
tests/test_metal_sparse_host.py runs their bodies and this launch code on the host."""

from __future__ import annotations

import functools
from importlib import resources

import mlx.core as mx


def fused_available(x: mx.array, act: str = "silu") -> bool:
    """Metal on an Apple GPU, silu only."""
    return act == "silu" and mx.metal.is_available() and mx.default_device() == mx.gpu


def fused_step(x, bundled, idx, c, y0, act: str = "silu"):
    if act != "silu":
        raise ValueError(f"the Metal sparse kernels compute silu, not {act}; use path 'gather'")
    return metal_step(x, bundled, idx, c, y0)


def _source(name: str) -> str:
    return resources.files("metal").joinpath(name).read_text()


@functools.cache
def _kernel(name: str, inputs: tuple, output: str):
    return mx.fast.metal_kernel(name=f"dn_{name}", input_names=list(inputs), output_names=[output],
                                source=_source(f"{name}.metal"))


def metal_step(x, bundled, idx, c, y0, simdgroups: int = 4):
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
