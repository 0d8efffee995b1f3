"""The sparse MLP, written once over a backend's ops (the Keras 3 way): routing, selection, the prior and
tape/replay are policy and live here; `dn_<backend>.ops` supplies the array ops and fused kernels, and
`dn_<backend>.sparse.SparseMLP` only binds this class to its framework's Module.

dn/sparse.py holds the math and the numpy reference every path is tested against.

The neurons' weights come from the weight store in one of two forms:
- bundled [n, 3, d] ([gate row | up row | down column] per neuron; dense models): a kept neuron is one
  contiguous read, and the fused kernels run on it;
- the layer's own projections, in whatever format they are stored (lossless-coded, affine-quantized):
  kept rows of gate/up come from `ops.rows`, and the down projection runs on the scattered activations.
"""

from __future__ import annotations

from typing import Any

import numpy as np

GATHER_LIMIT = 1 << 22  # elements of [T, k, 3, d] above which a step uses the masked path
NATIVE_TOKENS = 4       # tokens up to which auto takes a C kernel (decode; dn/csrc/planes.c's most); more: masked
PATHS = ("auto", "gather", "masked", "fused", "native")


class SparseMLP:
    """One layer of the sparse spec. The backend subclass sets `ops` and calls `setup` from __init__."""

    ops: Any = None

    def setup(self, bundled, proj, layer, path: str = "auto", like=None) -> None:
        """bundled: [n, 3, d] backend array or None; proj: (gate, up, down) modules or None; neither: the
        router and prior alone (residency holds the neurons), at the dtype and device of `like`."""
        o = self.ops
        self.keep, self.n, self.path, self.oracle = layer.keep, layer.prior_c.shape[0], path, False
        self.router, self.select, self.act = layer.router, layer.select, layer.act
        self.tape, self.replay = None, None   # see tape_routes
        like = bundled if bundled is not None else o.weight_like(proj[0]) if proj is not None else like
        if bundled is not None:
            o.hold(self, "bundled", bundled)
        else:
            self.bundled = None
            self.gate_proj, self.up_proj, self.down_proj = proj or (None, None, None)
        # int4: router and sketch stay packed (affine 4-bit, groups of GROUP), run by the backend's quantized
        # matmul; lowrank: float32 factors [d, r], [r, 2n].
        if layer.router in ("int4", "int4gate"):
            self.router_q = o.int4_linear(layer.router_a, layer.router_b, like)
        elif layer.router == "planes":  # the gate and up weights' own sketches (dn/planes.py), [2n, 3d/4]
            o.hold(self, "router_a", o.from_numpy(layer.router_a, like))
            o.hold(self, "router_lut", o.from_numpy(np.stack([_lut(m) for m in layer.router_b]), like))
            self.router_meta = np.asarray(layer.router_b, np.float32)
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
            o.hold(self, "sketch_lut", o.from_numpy(_lut(layer.prior_b[0]), like))
            self.sketch_meta = np.asarray(layer.prior_b[0], np.float32)
        elif self.sketch:  # int4 down matrix [d, n], in the router's format
            self.sketch_q = o.int4_linear(layer.prior_a, layer.prior_b, like)
        self.planes = None  # the split-planes kernel's matrices, built at its first call (_planes)

    # ---- routing ----------------------------------------------------------------------------------

    def estimate(self, x):
        """x [T, d] -> the router's estimate act(g^) * u^ of every neuron's activation, [T, n] float32."""
        o = self.ops
        if self.router == "int4gate":  # the gate alone: the up value's size is in the thresholds
            return o.act(self.act, o.int4_matmul(x, self.router_q))
        if self.router == "int4":
            p = o.int4_matmul(x, self.router_q)
        elif self.router == "planes":
            n, d, xf = self.n, x.shape[-1], o.float32(x)
            return o.act(self.act, xf @ o.planes_values(self.router_a[:n], self.router_lut[0], d).T) * (
                xf @ o.planes_values(self.router_a[n:], self.router_lut[1], d).T)
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
            y, _ = self.ops.planes_step(x2, self._planes(), self.thresh, self.prior_c32, self.prior_y0, self.act,
                                        self.sketch)
            return y.reshape(shape)
        est = self.estimate(x2)                                  # [T, n]: routes, and feeds the sketch prior
        mask = self.route(x2, est)
        if self.tape is not None:
            self.tape.append(self.ops.to_numpy(mask))
            if self.replay is not None:
                mask = self.ops.from_numpy(self.replay.pop(0), x)
        return self.step(x2, mask, est).reshape(shape)

    # ---- execution --------------------------------------------------------------------------------

    def step(self, x, mask, est=None):
        """x [T, d], mask bool [T, n] -> y [T, d]: kept neurons exactly, skipped ones by the prior."""
        o = self.ops
        if (self.path == "native" and self.router == "planes" and self.bundled is not None
                and self.select == "threshold" and x.shape[0] <= NATIVE_TOKENS and o.planes_native(x)):  # replayed
            return self.ops.planes_step(x, self._planes(), self.thresh, self.prior_c32, self.prior_y0, self.act,
                                        self.sketch, mask)[0]
        y = self._kept(x, mask)
        if self.sketch:
            est = self.estimate(x) if est is None else est
            if self.router == "planes":
                w = o.planes_values(self.sketch_a, self.sketch_lut, x.shape[-1])
                return y + o.cast(o.zero_where(est, mask) @ w, y)
            y = y + o.cast(o.int4_matmul(o.zero_where(est, mask), self.sketch_q), y)
        return y

    # ---- split planes: the C kernel routes and reads the kept neurons' rest in one pass -------------------------

    def _planes_fused(self, x) -> bool:
        return (self.router == "planes" and self.select == "threshold" and self.bundled is not None
                and self.tape is None and not self.oracle and self.path in ("auto", "native")
                and x.shape[0] <= NATIVE_TOKENS and self.ops.planes_native(x))

    def _planes(self):
        """The kernel's (gate, up, down) matrices: this layer's sketches, and the rests of its bundled weights
        (checked to be the weights the sketches were split from)."""
        if self.planes is None:
            from dn import planes

            o, n = self.ops, self.n
            bits = o.bits16(self.bundled)  # bf16 [n, 3, d]
            metas = (self.router_meta[0], self.router_meta[1], self.sketch_meta if self.sketch else None)
            sks = (o.to_numpy(self.router_a[:n]), o.to_numpy(self.router_a[n:]),
                   o.to_numpy(self.sketch_a) if self.sketch else None)
            mats = []
            for i, (sk, meta) in enumerate(zip(sks, metas)):
                if sk is None:  # no sketch prior: split the down rows here, for the kept ones' exact weights
                    sk, meta, rest = planes.split(np.ascontiguousarray(bits[:, i]))
                else:
                    rest = planes.rest_of(np.ascontiguousarray(bits[:, i]), sk, meta)
                mats.append(planes.mat({k: o.from_numpy(v, self.thresh)
                                        for k, v in planes.arrays(sk, meta, rest).items()}))
            self.prior_c32 = o.float32(self.prior_c)
            self.planes = tuple(mats)
        return self.planes

    def _kept(self, x, mask):
        o = self.ops
        t, d = x.shape
        same = t == 1 or self.select == "topk"   # every row keeps the same count: [T, k] indices exist
        path = self.path
        if path == "auto" and self.bundled is not None and t <= NATIVE_TOKENS and o.native_available(x, self.bundled):
            path = "native"
        elif path == "auto":
            fused = self.bundled is not None and same and o.fused_available(x, self.act)
            path = "fused" if fused else (
                "gather" if same and t * self.keep * 3 * d <= GATHER_LIMIT else "masked")
        if path == "masked":
            return self._masked(x, mask)
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
        return self.gate_proj(x), self.up_proj(x)

    def _masked(self, x, mask):
        g, u = self._project(x)
        h = self.ops.act(self.act, g) * u - self.prior_c
        h = h * self.ops.cast(mask, h)
        down = h @ self.bundled[:, 2] if self.bundled is not None else self.down_proj(h)
        return down + self.prior_y0

    def _gather(self, x, idx):
        o = self.ops
        t, k = idx.shape
        if self.bundled is not None:
            w = o.take_rows(self.bundled, idx)                    # [T, k, 3, d]
            wg, wu, wd = w[:, :, 0], w[:, :, 1], w[:, :, 2]
        else:
            wg, wu = (o.rows(p, idx.reshape(-1)).reshape(t, k, -1) for p in (self.gate_proj, self.up_proj))
        h = o.act(self.act, o.rowdot(wg, x)) * o.rowdot(wu, x) - o.take(self.prior_c, idx)
        if self.bundled is not None:
            return o.rowsum(h, wd) + self.prior_y0
        # stored down is [d, n] in its own format: run it on the kept activations scattered back to [T, n]
        return self.down_proj(o.scatter(h, idx, self.n)) + self.prior_y0


def _lut(meta) -> np.ndarray:
    """A split-planes meta -> the router's 64 w^ values, float32."""
    from dn import planes

    return planes.to_float32(planes.luts(np.asarray(meta, np.float32))[0])


# ---- policy on a whole model: install, tape/replay, numpy entry points ---------------------------------

def install(model, s, cls) -> None:
    """Patch the MLPs with an in-memory SparseSpec (re-installing over SparseMLPs reuses their weights)."""
    from dn.errors import DnError

    if len(s.layers) != len(model.model.layers):
        raise DnError(f"sparse spec has {len(s.layers)} layers, the model {len(model.model.layers)}")
    for i, layer in enumerate(model.model.layers):
        layer.mlp = cls(layer.mlp, s.layers[i])  # copies the arrays: s (memory-mapped) is not kept


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
