"""The resident MLP: one layer's MLP under a plan, in its three modes (dn.runtime.residency's docstring), written
once over a backend's `resident` module R (dn.runtime.backend.Backend.resident) and R.ops, the backend's
array ops (dn.runtime.sparse_mlp's contract)."""

from __future__ import annotations

import numpy as np

from dn.model.spec import ModelSpec
from dn.runtime.residency.cold import ColdTier
from dn.runtime.residency.plan import Plan


def part_info(spec: ModelSpec, dtype: str, kind: str) -> dict:
    """What blocks read together need to compute, kept in the cold file's index (kind: dense, or R.layout's; a
    GGUF's block types of gate, up and down per layer)."""
    q, a = spec.quant or {}, spec.architecture
    info = {"kind": kind, "dtype": dtype, "d": a.hidden_size,
            "bits": q.get("bits"), "group_size": q.get("group_size"), "act": a.mlp_act}
    if spec.gguf:
        info["types"] = [[spec.gguf[f"model.layers.{i}.mlp.{p}_proj"] for p in ("gate", "up", "down")]
                         for i in range(a.num_hidden_layers)]
    return info


def layer_info(info: dict, layer: int) -> dict:
    """The index's part info for one layer (its GGUF types, where the index has them per layer)."""
    return info | {"types": info["types"][layer]} if "types" in info else info


class ResidentMLP:
    """One layer's MLP under a plan. A part is k blocks read together, made backend arrays by R.join: a bundle
    [k*block, 3, d] (dense), or per projection (weight, scales, biases) for R.matmul."""

    def __init__(self, R, tier: ColdTier, layer: int, plan: Plan, runtime, sparse=None):
        self.R, self.ops, self.tier, self.layer, self.plan, self.rt = R, R.ops, tier, layer, plan, runtime
        self.info = layer_info(tier.index["part"], layer)
        self.dense = self.info["kind"] == "dense"
        self.h, self.n_blocks, self.block = plan.hot[layer], plan.blocks, plan.block
        self.order = np.asarray(tier.order(layer))
        self.hot = self._part(tier.read(layer, 0, self.h, copy=True), held=True) if self.h else None
        self.y0 = None              # per-sequence: the answer for the neurons outside the selected set
        self.sparse = sparse        # sparse mode: the layer's router and prior (dn.runtime.sparse_mlp.SparseMLP)
        self._perm = self._c = None

    def _part(self, arrays, held: bool = False):
        """held: kept resident (the backend may lay it out for every token's use)."""
        return None if arrays is None else self.R.join(arrays, self.info, held)

    def _matmul(self, part, j: int, x):
        return self.R.matmul(x, *part[j], self.info)

    def _acts(self, part, x):
        """x [T, d] -> act(gate x) * (up x), [T, k]: the model's activation (SiLU, Gemma's GELU tanh; a cold file
        written before it was recorded is SiLU)."""
        name = self.info.get("act", "silu")
        if self.dense:
            return self.ops.act(name, x @ part[:, 0].T) * (x @ part[:, 1].T)
        return self.ops.act(name, self._matmul(part, 0, x)) * self._matmul(part, 1, x)

    def _down(self, part, h):
        """h [T, k] -> the down projection of those neurons, [T, d]."""
        return h @ part[:, 2] if self.dense else self._matmul(part, 2, h)

    def _numpy(self, a) -> np.ndarray:
        return self.ops.to_numpy(self.ops.float32(a))

    def _array(self, a: np.ndarray, like):
        """numpy -> an array at like's device and dtype."""
        return self.ops.cast(self.ops.from_numpy(a, like), like)

    # exact ----------------------------------------------------------------------------------------------
    def read_cold(self, held: bool = False):
        """This layer's cold blocks read and joined (held: laid out as resident ones, on a prefetch worker)."""
        return self._part(self.tier.read(self.layer, self.h, self.n_blocks), held)

    def _cold(self):
        """This layer's cold blocks as one part: prefetched (read, or read and joined), or read now."""
        if self.h == self.n_blocks:
            return None
        got = self.rt.take(self.layer)
        if got is None:
            return self.read_cold()
        return got if self.rt.joins else self._part(got)

    def __call__(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        self.rt.count(self.layer, x.shape[0])
        if self.plan.mode == "sparse":
            y = self._sparse(x)
        elif self.plan.mode == "per-sequence" and (x.shape[0] > 1 or self.y0 is None):
            y = self._select(x)
        elif self.plan.mode == "per-sequence":
            y = self._down(self.hot, self._acts(self.hot, x)) + self.y0
        else:
            cold = self._cold()
            self.rt.prefetch_next(self.layer)
            y = None
            for p in (self.hot, cold):
                if p is not None:
                    yp = self._down(p, self._acts(p, x))
                    y = yp if y is None else y + yp
            del cold
        y = self.R.settle(y)
        if self.h < self.n_blocks:
            self.tier.release(self.layer)  # the views of the cold blocks are gone with their part
        return y.reshape(shape)

    # per-sequence ---------------------------------------------------------------------------------------
    def _select(self, x):
        """A prompt: every block, as exact mode (the first `prompt` rows only, when set, are the prompt); then the
        layer keeps the blocks most active on the prompt, and the prompt's mean activation of the others."""
        t = x.shape[0]
        p = t if not self.rt.prompt_tokens else min(t, self.rt.prompt_tokens)
        if self.h == self.n_blocks:
            self.y0 = 0
            return self._down(self.hot, self._acts(self.hot, x))
        every = self._part(self.tier.read(self.layer, 0, self.n_blocks))
        a = self._acts(every, x[:p])                                # [p, n] in file order
        a_np = self._numpy(a)
        score = (a_np.astype(np.float32) ** 2).sum(0).reshape(self.n_blocks, self.block).sum(1)
        keep = np.sort(np.argsort(-score, kind="stable")[:self.h])  # file positions
        mean = a_np.mean(0)
        y_prompt = self._down(every, a)
        # y0 = D m - D[:, kept] m[kept]: the prompt's mean output less what the kept neurons add at their mean
        sel = np.zeros(self.n_blocks * self.block, bool)
        sel.reshape(self.n_blocks, self.block)[keep] = True
        rest = np.where(sel, 0, mean).astype(np.float32)[None]
        self.y0 = self._down(every, self._array(rest, a))
        del every
        self.hot = self._part(self.tier.read_positions(self.layer, keep, copy=True), held=True)
        if p == t:
            return y_prompt
        rest_y = self._down(self.hot, self._acts(self.hot, x[p:])) + self.y0
        return self.R.concat([y_prompt, rest_y])

    # sparse ---------------------------------------------------------------------------------------------
    def _sparse(self, x):
        """The router keeps neurons (original ids); the cold blocks holding kept neurons are read (whole
        blocks); kept neurons compute exactly, the sparse spec's prior answers for the rest."""
        s = self.sparse
        est = s.estimate(x)
        keep = s.route(x, est)
        if self._perm is None:   # file position -> neuron id, and the prior's constants in file order
            self._perm = (self.order[:, None] * self.block + np.arange(self.block)).reshape(-1)
            self._c = self._numpy(s.prior_c)[self._perm]
        m = self._numpy(keep)[:, self._perm] > 0                  # [T, n] in file order
        used = m.reshape(m.shape[0], self.n_blocks, self.block).any(axis=(0, 2))
        cold = np.flatnonzero(used[self.h:]) + self.h
        self.rt.hits += int(used[:self.h].sum())
        self.rt.misses += int(cold.size)
        y = s.prior_y0
        for part, pos in ((self.hot, np.arange(self.h)), (None, cold)):
            if not pos.size:
                continue
            part = part or self._part(self.tier.read_positions(self.layer, pos))
            cols = (pos[:, None] * self.block + np.arange(self.block)).reshape(-1)
            gate = self._array(np.where(m[:, cols], 1.0, 0.0).astype(np.float32), x)
            y = y + self._down(part, (self._acts(part, x) - self._array(self._c[cols], x)) * gate)
        if s.sketch:
            y = y + s.ops.cast(s.sketch_term(x, keep, est), y)
        return y
