"""Execute a dn sparse spec on MLX: each layer's MLP becomes router -> gather of the kept neurons'
bundled [gate | up | down] rows -> prior (dn/sparse.py has the math and the numpy reference).

Paths mirror dn_torch.sparse: `gather` (take of bundled rows, three contractions), `masked` for many
tokens at once, and `metal` (metal/sparse_hidden.metal + metal/sparse_down.metal through
mx.fast.metal_kernel; Apple GPU only, so it is not exercised on Linux).
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx import nn

from dn import sparse as ref

GATHER_LIMIT = 1 << 22  # elements of [T, k, 3, d] above which a step uses the masked path
_DT = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def _np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def mlp_weights(model, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Layer i's (gate [n, d], up [n, d], down [d, n]) as float32 numpy."""
    mlp = model.model.layers[i].mlp
    if isinstance(mlp, SparseMLP):
        b = _np(mlp.bundled)
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


class SparseMLP(nn.Module):
    """Drop-in for a SwiGLU MLP executing one layer of the spec."""

    def __init__(self, bundled: mx.array, layer: ref.LayerSparse, path: str = "auto"):
        super().__init__()
        dt = bundled.dtype
        self.keep, self.n, self.path, self.oracle = layer.keep, bundled.shape[0], path, False
        self.router, self.select = layer.router, layer.select
        self.tape, self.replay = None, None   # see tape_routes
        self.bundled = bundled                                          # [n, 3, d]
        if layer.router == "int4":
            # dn's packed nibbles (value q - 8, low nibble first) read as uint32 are MLX's 4-bit affine
            # layout with bias -8 * scale: the router stays resident at 4 bits, via quantized_matmul.
            self.router_a = mx.array(np.ascontiguousarray(layer.router_a).view(np.uint32))
            self.router_b = mx.array(np.asarray(layer.router_b, np.float32))
        else:
            self.router_a = mx.array(np.asarray(layer.router_a, np.float32))
            self.router_b = mx.array(np.asarray(layer.router_b, np.float32))
        t = layer.thresh if layer.select == "threshold" else np.zeros(0, np.float32)
        self.thresh = mx.array(np.asarray(t, np.float32))
        self.prior_c = mx.array(np.asarray(layer.prior_c, np.float32)).astype(dt)
        self.prior_y0 = mx.array(np.asarray(layer.prior_y0, np.float32)).astype(dt)
        # sketch prior: int4 down matrix [d, n] in the router's layout, applied by quantized_matmul
        self.sketch = layer.prior_a is not None
        if self.sketch:
            self.prior_a = mx.array(np.ascontiguousarray(layer.prior_a).view(np.uint32))
            self.prior_b = mx.array(np.asarray(layer.prior_b, np.float32))

    def estimate(self, x: mx.array) -> mx.array:
        """x [T, d] -> the router's estimate silu(g^) * u^ of every neuron's activation, [T, n] float32."""
        if self.router == "int4":
            p = _int4_matmul(x.astype(mx.float32), self.router_a, self.router_b)
        else:
            p = (x.astype(mx.float32) @ self.router_a) @ self.router_b
        return nn.silu(p[:, :self.n]) * p[:, self.n:]

    def scores(self, x: mx.array, est: mx.array | None = None) -> mx.array:
        """x [T, d] -> router scores [T, n] float32 (est: the estimate, when already computed)."""
        if self.oracle:
            b = self.bundled
            return mx.abs(nn.silu(x @ b[:, 0].T) * (x @ b[:, 1].T)).astype(mx.float32)
        return mx.abs(self.estimate(x) if est is None else est)

    def route(self, x: mx.array, est: mx.array | None = None) -> mx.array:
        """x [T, d] -> kept neurons, bool [T, n]."""
        s = self.scores(x, est)
        if self.select == "threshold":
            return s > self.thresh
        idx = mx.argpartition(-s, self.keep - 1, axis=1)[:, :self.keep]
        return mx.put_along_axis(mx.zeros(s.shape, mx.bool_), idx, mx.array(True), axis=1)

    def __call__(self, x: mx.array) -> mx.array:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        est = self.estimate(x2)                                  # [T, n]: routes, and feeds the sketch prior
        mask = self.route(x2, est)
        if self.tape is not None:
            self.tape.append(np.array(mask))
            if self.replay is not None:
                mask = mx.array(self.replay.pop(0))
        return self.step(x2, mask, est).reshape(shape)

    def step(self, x: mx.array, mask: mx.array, est: mx.array | None = None) -> mx.array:
        """x [T, d], mask bool [T, n] -> y [T, d]: kept neurons exactly, skipped ones by the prior."""
        y = self._kept(x, mask)
        if self.sketch:
            est = self.estimate(x) if est is None else est
            y = y + self._sketch(est, mask).astype(y.dtype)
        return y

    def _sketch(self, est, mask):
        """The router's estimate of the skipped neurons [T, n] times the int4 down sketch -> [T, d] float32."""
        return _int4_matmul(mx.where(mask, 0.0, est), self.prior_a, self.prior_b)

    def _kept(self, x: mx.array, mask: mx.array) -> mx.array:
        t, d = x.shape
        path = self.path
        same = t == 1 or self.select == "topk"   # every row keeps the same count: [T, k] indices exist
        if path == "auto":
            if _on_metal() and same:
                path = "metal"
            else:
                path = "gather" if same and t * self.keep * 3 * d <= GATHER_LIMIT else "masked"
        if path == "masked":
            return self._masked(x, mask)
        if not same:
            raise ValueError(f"path {path!r} needs the same kept count per token; use 'masked'")
        m = np.array(mask)                           # MLX has no nonzero: the indices come from the host
        idx = mx.array(np.nonzero(m)[1].reshape(t, -1).astype(np.uint32))              # [T, k] sorted
        if idx.shape[1] == 0:                    # threshold selection may keep no neuron: the prior alone
            return mx.broadcast_to(self.prior_y0, (t, d))
        return {"gather": self._gather, "metal": self._metal}[path](x, idx)

    def _gather(self, x, idx):
        w = mx.take(self.bundled, idx.reshape(-1), axis=0).reshape(*idx.shape, 3, -1)  # [T, k, 3, d]
        g = (w[:, :, 0] @ x[:, :, None])[..., 0]
        u = (w[:, :, 1] @ x[:, :, None])[..., 0]
        h = nn.silu(g) * u - mx.take(self.prior_c, idx)
        return (h[:, None, :] @ w[:, :, 2])[:, 0] + self.prior_y0

    def _masked(self, x, mask):
        b = self.bundled
        h = nn.silu(x @ b[:, 0].T) * (x @ b[:, 1].T) - self.prior_c
        return (h * mask.astype(h.dtype)) @ b[:, 2] + self.prior_y0

    def _metal(self, x, idx):
        return _metal_step(x, self.bundled, idx, self.prior_c, self.prior_y0)


def _int4_matmul(x: mx.array, packed: mx.array, scales: mx.array) -> mx.array:
    """x [T, k] float32 @ W.T for W [m, k] held as dn's packed int4 (uint32 view [m, k/8], scales [m, k/GROUP])."""
    return mx.quantized_matmul(x, packed, scales, -8 * scales, transpose=True, group_size=ref.GROUP, bits=4)


def _on_metal() -> bool:
    return mx.metal.is_available() and mx.default_device() == mx.gpu


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


def install(model, s: ref.SparseSpec) -> None:
    """Patch the MLPs with an in-memory SparseSpec (re-installing over SparseMLPs reuses their bundles)."""
    if len(s.layers) != len(model.model.layers):
        raise ref.DnError(f"sparse spec has {len(s.layers)} layers, the model {len(model.model.layers)}")
    for i, layer in enumerate(model.model.layers):
        layer.mlp = sparse_mlp(layer.mlp, s.layers[i])
    model.dn_sparse = s


def sparse_mlp(mlp, layer: ref.LayerSparse) -> SparseMLP:
    """A SparseMLP for one layer, from a dense SwiGLU MLP or another SparseMLP (whose bundle it shares)."""
    if isinstance(mlp, SparseMLP):
        return SparseMLP(mlp.bundled, layer)
    bundled = mx.stack([mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight.T], axis=1)
    return SparseMLP(mx.contiguous(bundled), layer)


def attach(model, model_dir: Path, spec) -> None:
    """Replace every layer's MLP by a SparseMLP executing spec.sparse (validated against the model)."""
    install(model, ref.load_for_model(model_dir, spec))


def tape_routes(model, replay: list[list[np.ndarray]] | None = None) -> list[list[np.ndarray]]:
    """Tape every sparse layer's router decisions (bool [T, n] per call, in call order) until
    untape_routes. With replay (another run's tapes), each layer executes those decisions instead of its
    own, still taping its own: parity runs two backends on identical routing and compares both."""
    tapes = []
    for i, layer in enumerate(model.model.layers):
        layer.mlp.tape = []
        layer.mlp.replay = None if replay is None else list(replay[i])
        tapes.append(layer.mlp.tape)
    return tapes


def untape_routes(model) -> None:
    for layer in model.model.layers:
        layer.mlp.tape, layer.mlp.replay = None, None


def route(x: np.ndarray, mlp: SparseMLP) -> np.ndarray:
    """x [T, d] numpy -> the neurons the backend keeps, bool [T, n]."""
    return np.array(mlp.route(mx.array(x).astype(mlp.bundled.dtype)))


def sparse_mlp_step(x: np.ndarray, mlp: SparseMLP, path: str = "auto") -> np.ndarray:
    """x [T, d] numpy -> y [T, d] float32 through the backend's sparse MLP (path: auto/gather/masked/metal)."""
    old, mlp.path = mlp.path, path
    try:
        return _np(mlp(mx.array(x).astype(mlp.bundled.dtype)))
    finally:
        mlp.path = old


def make_mlp(bundled: np.ndarray, layer: ref.LayerSparse, dtype: str = "float32", device: str | None = None):
    """A standalone SparseMLP (tests, benchmarks); device is ignored (MLX's default device)."""
    return SparseMLP(mx.array(np.asarray(bundled, np.float32)).astype(_DT[dtype]), layer)
