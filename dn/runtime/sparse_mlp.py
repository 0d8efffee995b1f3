"""The sparse MLP, written once over a backend's ops (the Keras 3 way): routing, selection, the prior and
tape/replay are policy and live here; `dn_<backend>.ops` supplies the array ops and the optional kernels its
CAPABILITIES declare (dn.runtime.backend.Ops; `can` asks), and `dn_<backend>.sparse.SparseMLP` only binds this
class to its framework's Module.

dn/formats/sparse.py holds the math and the numpy reference every path is tested against.

The neurons' weights come from the weight store in one of two forms:
- bundled [n, 3, d] ([gate row | up row | down column] per neuron; dense models): a kept neuron is one
  contiguous read, and the fused kernels run on it;
- the layer's own projections, in whatever format they are stored (lossless-coded, affine-quantized):
  kept rows of gate/up come from `ops.rows`, and the down projection runs on the scattered activations.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from dn.core.errors import DnError
from dn.formats import planes, sparse

GATHER_LIMIT = 1 << 22  # elements of [T, k, 3, d] above which a step uses the masked path
# tokens up to which auto takes a C kernel (decode; dn/formats/csrc/planes.c's most); more: masked
NATIVE_TOKENS = 4
PATHS = ("auto", "gather", "masked", "fused", "native")
# a dense MLP's attribute (a plain one) where a loader puts the bundle its weights are views of: (bundle, weights)
LAID_OUT = "_dn_bundled"


def can(ops, capability: str) -> bool:
    """Whether a backend's ops have an optional kernel group (dn.runtime.backend.CAPABILITIES): its functions exist
    only then; whether they run on given arrays is the group's own check (native_available, ...)."""
    return capability in ops.CAPABILITIES


class SparseMLP:
    """One layer of the sparse spec over `mlp` (a dense MLP, a bundle [n, 3, d], a SparseMLP whose weights it takes
    over, or projections in another format); mlp None: the router and prior alone (residency holds the neurons), at
    like's dtype and device. A backend subclass sets `ops` and lists its framework's Module next in its bases (whose
    __init__ runs first)."""

    ops: Any = None

    def __init__(self, mlp, layer: sparse.LayerSparse, path: str = "auto", like=None):
        super().__init__()  # the framework's Module, where the backend's class lists one
        bundled, proj = (None, None) if mlp is None else self.weights_of(mlp)
        self.setup(bundled, proj, layer, path, like)

    def weights_of(self, mlp):
        """(bundled, None) for a bundle, a dense MLP or a bundled layer; (None, projections) for other formats."""
        if isinstance(mlp, SparseMLP):  # a split layer's bundle is decoded (its next spec splits it again)
            return (mlp.bundle(), None) if mlp.bundled is not None or mlp.split else (
                None, (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        if not hasattr(mlp, "gate_proj"):  # a bundle [n, 3, d], held row-contiguous for the kernels
            return self.ops.contiguous(mlp), None
        proj = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if not all(self.ops.is_dense(p) for p in proj):
            return None, proj
        b, weights = vars(mlp).get(LAID_OUT, (None, ()))
        if b is None or any(p.weight is not w for p, w in zip(proj, weights)):  # none, or no longer its views
            b = self.ops.stack([proj[0].weight, proj[1].weight, proj[2].weight.T], 1)
        return b, None

    def setup(self, bundled, proj, layer, path: str = "auto", like=None) -> None:
        """bundled: [n, 3, d] backend array or None; proj: (gate, up, down) modules or None; neither: the
        router and prior alone (residency holds the neurons), at the dtype and device of `like`."""
        o = self.ops
        self.keep, self.n, self.path, self.oracle = layer.keep, layer.prior_c.shape[0], path, False
        self.router, self.select, self.act = layer.router, layer.select, layer.act
        self.tape, self.replay = None, None   # see tape_routes
        like = bundled if bundled is not None else o.weight_like(proj[0]) if proj is not None else like
        # router "planes" on bf16 weights: the weights are held as their split planes (12 bits), not the bundle
        split_bits = o.bits16(bundled) if layer.router == "planes" and bundled is not None and o.is_bfloat16(
            bundled) else None
        if split_bits is not None:
            bundled = None
        if bundled is not None:
            o.hold(self, "bundled", bundled)
        else:
            self.bundled = None
            self.gate_proj, self.up_proj, self.down_proj = proj or (None, None, None)
        # int4: router and sketch stay packed (affine 4-bit, groups of GROUP), run by the backend's quantized
        # matmul; lowrank: float32 factors [d, r], [r, 2n].
        if layer.router in ("int4", "int4gate"):
            self.router_q = o.int4_linear(layer.router_a, layer.router_b, like)
        elif layer.router == "planes":  # the gate and up weights' own sketches (dn/formats/planes.py), [2n, 3d/4]
            o.hold(self, "router_a", o.from_numpy(layer.router_a, like))
        else:
            o.hold(self, "router_a", o.from_numpy(np.asarray(layer.router_a, np.float32), like))
            o.hold(self, "router_b", o.from_numpy(np.asarray(layer.router_b, np.float32), like))
        t = layer.thresh if layer.select == "threshold" else np.zeros(0, np.float32)
        o.hold(self, "thresh", o.from_numpy(np.asarray(t, np.float32), like))
        o.hold(self, "prior_c", o.cast(o.from_numpy(np.asarray(layer.prior_c, np.float32), like), like))
        o.hold(self, "prior_y0", o.cast(o.from_numpy(np.asarray(layer.prior_y0, np.float32), like), like))
        self.sketch = layer.prior_a is not None
        if self.sketch and layer.router == "planes":  # the down matrix's own sketch, one row per neuron
            o.hold(self, "sketch_a", o.from_numpy(layer.prior_a, like))
        elif self.sketch:  # int4 down matrix [d, n], in the router's format
            self.sketch_q = o.int4_linear(layer.prior_a, layer.prior_b, like)
        self.split, self.planes = split_bits is not None, None
        if layer.router == "planes":
            self._hold_planes(layer, like, split_bits)

    def _hold_planes(self, layer, like, bits) -> None:
        """Router "planes": self.planes holds per matrix (gate, up, down's columns as rows) its arrays by
        dn.formats.planes.FIELDS name, and "mat", the C kernels' struct, where those run. The sketches are the
        spec's (the down's: with the sketch prior); with bits (the bundled bf16 weights [n, 3, d]) the rests too,
        checked to complete the spec's sketches into these very weights: the layer is then held split, with no
        bundle."""
        o, n = self.ops, self.n
        sks = [layer.router_a[:n], layer.router_a[n:], layer.prior_a if self.sketch else None]
        metas = [layer.router_b[0], layer.router_b[1], layer.prior_b[0] if self.sketch else None]
        views = [self.router_a[:n], self.router_a[n:], self.sketch_a if self.sketch else None]  # held already
        mats = []
        for i, (sk, meta) in enumerate(zip(sks, metas)):
            rest = None
            if bits is not None:
                w = np.ascontiguousarray(bits[:, i])
                if sk is None:  # no sketch prior: the down rows are split here, for the kept ones' exact weights
                    sk, meta, rest = planes.split(w)
                else:
                    rest = planes.rest_of(w, np.asarray(sk), np.asarray(meta, np.float32))
            if sk is None:
                mats.append(None)
                continue
            held = {}
            for name, a in planes.arrays(sk, np.asarray(meta, np.float32), rest).items():
                if name == "sketch" and views[i] is not None:
                    held[name] = views[i]
                    continue
                o.hold(self, f"planes{i}_{name}", o.from_numpy(a, like))
                held[name] = getattr(self, f"planes{i}_{name}")
            mats.append(o.planes_held(held) if can(o, "native_planes") else held)
        self.planes = _Planes(mats, o.float32(self.prior_c))  # the C kernels take c in float32

    # ---- routing ----------------------------------------------------------------------------------

    def estimate(self, x):
        """x [T, d] -> the router's estimate act(g^) * u^ of every neuron's activation, [T, n] float32."""
        o = self.ops
        if self.router == "int4gate":  # the gate alone: the up value's size is in the thresholds
            return o.act(self.act, o.int4_matmul(x, self.router_q))
        if self.router == "int4":
            p = o.int4_matmul(x, self.router_q)
        elif self.router == "planes":
            if self._native_planes(x):
                return o.planes_estimate(x, self.planes[0], self.planes[1], self.act)
            xf = o.float32(x)  # one matrix's w^ decoded at a time: the scratch is shared
            g = xf @ o.float32(self._decode(0, exact=False)).T
            return o.act(self.act, g) * (xf @ o.float32(self._decode(1, exact=False)).T)
        else:
            p = (o.float32(x) @ self.router_a) @ self.router_b
        return o.act(self.act, p[:, :self.n]) * p[:, self.n:]

    def scores(self, x, est=None):
        """x [T, d] -> router scores [T, n] float32 (est: the estimate, when already computed)."""
        o = self.ops
        if self.oracle:  # route by the true activations (quality baselines only)
            g, u = self._project(x)
            return o.float32(o.abs(o.act(self.act, g) * u))
        return o.abs(self.estimate(x) if est is None else est)

    def route(self, x, est=None):
        """x [T, d] -> kept neurons, bool [T, n]."""
        s = self.scores(x, est)
        if self.select == "threshold":
            return s > self.thresh
        return self.ops.topk_mask(s, self.keep)

    def call(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self._planes_fused(x2):  # routing, kept neurons and prior in one C pass
            y, _ = self.ops.planes_step(x2, self._mats(), self.thresh, self.planes.c32, self.prior_y0, self.act,
                                        self.sketch)
            return y.reshape(shape)
        est = self.estimate(x2)                                  # [T, n]: routes, and feeds the sketch prior
        mask = self.route(x2, est)
        if self.tape is not None:
            self.tape.append(self.ops.to_numpy(mask))
            if self.replay is not None:
                mask = self.ops.from_numpy(take_rows(self.replay, x2.shape[0]), x)
        return self.step(x2, mask, est).reshape(shape)

    # ---- execution --------------------------------------------------------------------------------

    def step(self, x, mask, est=None):
        """x [T, d], mask bool [T, n] -> y [T, d]: kept neurons exactly, skipped ones by the prior."""
        o = self.ops
        if self.split and self.path == "native" and self.select == "threshold" and self._native_planes(x):
            return o.planes_step(x, self._mats(), self.thresh, self.planes.c32, self.prior_y0, self.act,
                                 self.sketch, mask)[0]  # a given selection, replayed
        y = self._kept(x, mask)
        if self.sketch:
            y = y + o.cast(self.sketch_term(x, mask, est), y)
        return y

    def sketch_term(self, x, mask, est=None):
        """The sketch prior's answer for the skipped neurons, [T, d] float32: est^ (the router's estimate where
        mask is False) times the down matrix's sketch."""
        o = self.ops
        h = o.zero_where(self.estimate(x) if est is None else est, mask)
        if self.router != "planes":
            return o.int4_matmul(h, self.sketch_q)
        if self._native_planes(x):
            return o.planes_sketch(h, self.planes[2])
        return h @ o.float32(self._decode(2, exact=False))

    # ---- split planes: the C kernel routes and reads the kept neurons' rest in one pass -------------------------

    def _native_planes(self, x) -> bool:
        """The planes C kernels take these tokens: a few, bf16, on CPU, the kernels built."""
        return (self.planes is not None and "mat" in self.planes[0] and x.shape[0] <= NATIVE_TOKENS
                and can(self.ops, "native_planes") and self.ops.planes_native(x))

    def _planes_fused(self, x) -> bool:
        return (self.split and self.select == "threshold" and self.tape is None and not self.oracle
                and self.path in ("auto", "native") and self._native_planes(x))

    def _mats(self):
        """The C kernels' (gate, up, down) structs."""
        return tuple(m["mat"] for m in self.planes)

    def _decode(self, i: int, exact: bool = True):
        """Matrix i (gate, up, down's columns as rows) as bf16 [n, d], its exact weights (split layers) or its
        sketch's w^, decoded into the backend's shared scratch: valid until the next decode."""
        m = self.planes[i]
        rows, d = m["sketch"].shape[0], m["sketch"].shape[1] * 4 // 3
        return self.ops.planes_decode(m, d, self.ops.scratch(rows, d), exact)

    def bundle(self):
        """The layer's bundled weights [n, 3, d]: the held bundle, or a split layer's decoded (a new array)."""
        if not self.split:
            return self.bundled
        d = self.planes[0]["sketch"].shape[1] * 4 // 3
        return self.ops.stack([self.ops.planes_decode(m, d) for m in self.planes], 1)

    def _kept(self, x, mask):
        o = self.ops
        t, d = x.shape
        same = t == 1 or self.select == "topk"   # every row keeps the same count: [T, k] indices exist
        path = self.path
        if path == "auto" and self.bundled is not None and t <= NATIVE_TOKENS and can(o, "native_sparse") and \
                o.native_available(x, self.bundled):
            path = "native"
        elif path == "auto":
            fused = self.bundled is not None and same and can(o, "fused_sparse") and o.fused_available(x, self.act)
            path = "fused" if fused else (
                "gather" if same and t * self.keep * 3 * d <= GATHER_LIMIT else "masked")
        if path == "masked" or (path == "native" and self.bundled is None):  # native: a split layer past the
            return self._masked(x, mask)                                      # planes kernel's tokens
        need = {"native": "native_sparse", "fused": "fused_sparse"}.get(path)
        if need is not None and not can(o, need):
            raise ValueError(f"path {path!r} needs the backend's {need} kernels (dn.runtime.backend.CAPABILITIES)")
        if path == "native":  # any count per token: no kept_indices
            return o.native_step(x, self.bundled, mask, self.prior_c, self.prior_y0, self.act)
        if not same:
            raise ValueError(f"path {path!r} needs the same kept count per token; use 'masked'")
        idx = o.kept_indices(mask)                                # [T, k], sorted
        if idx.shape[1] == 0:                    # threshold selection may keep no neuron: the prior alone
            return o.broadcast_to(self.prior_y0, (t, d))
        if path == "fused":
            return o.fused_step(x, self.bundled, idx, self.prior_c, self.prior_y0, self.act)
        return self._gather(x, idx)

    def _project(self, x):
        """Every neuron's gate and up pre-activations, [T, n] each."""
        if self.bundled is not None:
            return x @ self.bundled[:, 0].T, x @ self.bundled[:, 1].T
        if self.split:  # one matrix decoded at a time (the scratch is shared)
            g = x @ self._decode(0).T
            return g, x @ self._decode(1).T
        return self.gate_proj(x), self.up_proj(x)

    def _masked(self, x, mask):
        g, u = self._project(x)
        h = self.ops.act(self.act, g) * u - self.prior_c
        h = h * self.ops.cast(mask, h)
        down = (h @ self.bundled[:, 2] if self.bundled is not None else h @ self._decode(2) if self.split
                else self.down_proj(h))
        return down + self.prior_y0

    def _gather(self, x, idx):
        o = self.ops
        t, k = idx.shape
        if self.bundled is not None:
            w = o.take_rows(self.bundled, idx)                    # [T, k, 3, d]
            wg, wu, wd = w[:, :, 0], w[:, :, 1], w[:, :, 2]
        elif self.split:                                          # rows copied out of each decode in turn
            wg, wu, wd = (o.take_rows(self._decode(i), idx) for i in range(3))
        else:
            wg, wu = (o.rows(p, idx.reshape(-1)).reshape(t, k, -1) for p in (self.gate_proj, self.up_proj))
        h = o.act(self.act, o.rowdot(wg, x)) * o.rowdot(wu, x) - o.take(self.prior_c, idx)
        if self.bundled is not None or self.split:
            return o.rowsum(h, wd) + self.prior_y0
        # stored down is [d, n] in its own format: run it on the kept activations scattered back to [T, n]
        return self.down_proj(o.scatter(h, idx, self.n)) + self.prior_y0


class _Planes:
    """A router-"planes" layer's matrices (views of what the layer holds), in an object a framework does not take
    for more parameters to list; c32: the prior's c in float32."""

    def __init__(self, mats: list, c32):
        self.mats, self.c32 = mats, c32

    def __getitem__(self, i):
        return self.mats[i]

    def __iter__(self):
        return iter(self.mats)


# ---- policy on a whole model: install, tape/replay, numpy entry points ---------------------------------

def install(cls, model, s: sparse.SparseSpec) -> None:
    """Patch the MLPs with an in-memory SparseSpec, as cls (the backend's SparseMLP; re-installing over SparseMLPs
    reuses their weights)."""
    if len(s.layers) != len(model.model.layers):
        raise DnError(f"sparse spec has {len(s.layers)} layers, the model {len(model.model.layers)}")
    for i, layer in enumerate(model.model.layers):
        if not getattr(layer, "elsewhere", False):  # a pipeline rank's other ranks' layers: stubs
            layer.mlp = cls(layer.mlp, s.layers[i])  # copies the arrays: s (memory-mapped) is not kept


def attach(cls, model, model_dir: Path, spec) -> None:
    """Replace every layer's MLP by a cls executing spec.sparse (validated against the model), read a layer at a
    time."""
    install(cls, model, sparse.load_for_model(model_dir, spec, lazy=True))


def routers(cls, model_dir: Path, spec, like) -> list:
    """Each layer's router and prior without its neurons (residency holds those), as cls at like's dtype and
    device."""
    return [cls(None, layer, like=like) for layer in sparse.load_for_model(model_dir, spec, lazy=True).layers]


def collect_mlp_inputs(ops, tap, run, model, token_batches: list[np.ndarray]) -> list[np.ndarray]:
    """Run the model over token batches [B, L]; each layer's MLP inputs, float32 [sum B*L, d] (tap, run: bind's)."""
    got = [[] for _ in model.model.layers]
    undo = [tap(layer, lambda x, g=g: g.append(ops.to_numpy(ops.float32(x.reshape(-1, x.shape[-1])))))
            for layer, g in zip(model.model.layers, got)]
    try:
        for tokens in token_batches:
            run(model, np.asarray(tokens))
    finally:
        for u in undo:
            u()
    return [np.concatenate(g) for g in got]


class Bound(NamedTuple):
    """A backend's sparse functions (bind): attach for its loader, and dn.runtime.backend.Backend's others."""

    attach: Callable
    install_sparse: Callable
    mlp_weights: Callable
    collect_mlp_inputs: Callable


def bind(cls, tap, run) -> Bound:
    """A backend's sparse functions over its SparseMLP class cls (cls.ops its ops), tap(layer, record) (the layer's
    MLP calls record(x) on its input; returns what undoes that) and run(model, tokens [B, L] numpy)."""
    return Bound(attach=functools.partial(attach, cls), install_sparse=functools.partial(install, cls),
                 mlp_weights=functools.partial(mlp_weights, cls.ops),
                 collect_mlp_inputs=functools.partial(collect_mlp_inputs, cls.ops, tap, run))


def mlp_weights(ops, model, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Layer i's (gate [n, d], up [n, d], down [d, n]) as float32 numpy (dense or bundled layers)."""
    mlp = model.model.layers[i].mlp
    if isinstance(mlp, SparseMLP) and (mlp.bundled is not None or mlp.split):
        b = ops.to_numpy(ops.float32(mlp.bundle()))
        return b[:, 0], b[:, 1], b[:, 2].T.copy()
    return tuple(ops.to_numpy(ops.float32(p.weight)) for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))


def take_rows(tape: list[np.ndarray], n: int) -> np.ndarray:
    """The next n tokens' decisions of a replayed tape, however the taping run split its calls (one backend may
    prefill a prompt in one call, another in two)."""
    rows, got = [], 0
    while got < n:
        m = tape.pop(0)
        if got + m.shape[0] > n:
            tape.insert(0, m[n - got:])
            m = m[:n - got]
        rows.append(m)
        got += m.shape[0]
    return rows[0] if len(rows) == 1 else np.concatenate(rows)


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
    o = mlp.ops
    return o.to_numpy(mlp.route(o.cast(o.from_numpy(x, mlp.prior_c), mlp.prior_c)))


def step(x: np.ndarray, mlp: SparseMLP, path: str = "auto") -> np.ndarray:
    """x [T, d] numpy -> y [T, d] float32 through the backend's sparse MLP (path: one of PATHS)."""
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r} (choose from {', '.join(PATHS)})")
    o = mlp.ops
    old, mlp.path = mlp.path, path
    try:
        return o.to_numpy(o.float32(mlp.call(o.cast(o.from_numpy(x, mlp.prior_c), mlp.prior_c))))
    finally:
        mlp.path = old
