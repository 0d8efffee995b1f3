"""Execute a dn sparse spec on torch: each layer's MLP becomes router -> gather of the kept neurons'
bundled [gate | up | down] rows -> prior (dn/sparse.py has the math and the numpy reference).

Paths: `gather` (index_select of bundled rows, then three small contractions; any device), `triton`
(one fused kernel: gather, gate/up dot products, silu*up, prior correction and down accumulation; CUDA,
batch of one token), and `masked` for many tokens at once (prefill/eval): the same decisions applied
as a mask over the dense product, since gathering [T, k, 3, d] per token would not fit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from dn import sparse as ref

try:  # Triton only where a GPU backend is installed
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs
    triton = None

GATHER_LIMIT = 1 << 22  # elements of [T, k, 3, d] above which a step uses the masked path


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def mlp_weights(model, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Layer i's (gate [n, d], up [n, d], down [d, n]) as float32 numpy."""
    mlp = model.model.layers[i].mlp
    if isinstance(mlp, SparseMLP):
        b = _np(mlp.bundled)
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


def _unpack_int4(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Packed nibbles uint8 [m, d/2], scales [m, d/GROUP] -> float32 [m, d] (dn.sparse.dequantize_int4)."""
    m = q.shape[0]
    w = torch.stack([(q & 15), (q >> 4)], dim=-1).view(m, -1).float() - 8
    return (w.view(m, -1, ref.GROUP) * s[..., None]).view(m, -1)


def _int4_matmul(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
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


class SparseMLP(nn.Module):
    """Drop-in for a SwiGLU MLP executing one layer of the spec."""

    def __init__(self, bundled: torch.Tensor, layer: ref.LayerSparse, path: str = "auto"):
        super().__init__()
        n = bundled.shape[0]
        dt, dev = bundled.dtype, bundled.device
        self.keep, self.n, self.path, self.router, self.select = layer.keep, n, path, layer.router, layer.select
        self.oracle = False  # route by the true |silu(G x) * U x| (quality baselines only)
        self.tape, self.replay = None, None   # see tape_routes
        self.register_buffer("bundled", bundled.contiguous())                       # [n, 3, d]
        # int4: the packed nibbles stay resident (4 bits per weight) and are unpacked per call;
        # lowrank: factors [d, r], [r, 2n].
        self.register_buffer("router_a", torch.tensor(np.ascontiguousarray(layer.router_a), device=dev))
        self.register_buffer("router_b", torch.tensor(np.ascontiguousarray(layer.router_b), device=dev).float())
        t = layer.thresh if layer.select == "threshold" else np.zeros(0, np.float32)
        self.register_buffer("thresh", torch.tensor(np.asarray(t, np.float32), device=dev))
        self.register_buffer("prior_c", torch.tensor(np.asarray(layer.prior_c, np.float32), device=dev).to(dt))
        self.register_buffer("prior_y0", torch.tensor(np.asarray(layer.prior_y0, np.float32), device=dev).to(dt))
        # sketch prior: int4 down matrix, packed [d, n/2] + scales [d, n/GROUP], unpacked per call like the router
        self.sketch = layer.prior_a is not None
        if self.sketch:
            self.register_buffer("prior_a", torch.tensor(np.ascontiguousarray(layer.prior_a), device=dev))
            self.register_buffer("prior_b", torch.tensor(np.asarray(layer.prior_b, np.float32), device=dev))

    def estimate(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, d] -> the router's estimate silu(g^) * u^ of every neuron's activation, [T, n] float32."""
        if self.router == "int4":
            p = _int4_matmul(x.float(), self.router_a, self.router_b)
        else:
            p = (x.float() @ self.router_a.float()) @ self.router_b
        return nn.functional.silu(p[:, :self.n]) * p[:, self.n:]

    def scores(self, x: torch.Tensor, est: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, d] -> router scores [T, n] float32 (est: the estimate, when already computed)."""
        if self.oracle:
            b = self.bundled
            return (nn.functional.silu(x @ b[:, 0].T) * (x @ b[:, 1].T)).abs().float()
        return (self.estimate(x) if est is None else est).abs()

    def route(self, x: torch.Tensor, est: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, d] -> kept neurons, bool [T, n]."""
        s = self.scores(x, est)
        if self.select == "threshold":
            return s > self.thresh
        idx = torch.topk(s, self.keep, dim=1, sorted=False).indices
        return torch.zeros_like(s, dtype=torch.bool).scatter_(1, idx, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        est = self.estimate(x2)                                  # [T, n]: routes, and feeds the sketch prior
        mask = self.route(x2, est)
        if self.tape is not None:
            self.tape.append(mask.cpu().numpy())
            if self.replay is not None:
                mask = torch.as_tensor(self.replay.pop(0), device=mask.device)
        return self.step(x2, mask, est).reshape(shape)

    def step(self, x: torch.Tensor, mask: torch.Tensor, est: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, d], mask bool [T, n] -> y [T, d]: kept neurons exactly, skipped ones by the prior."""
        y = self._kept(x, mask)
        if self.sketch:
            est = self.estimate(x) if est is None else est
            y = y + self._sketch(est, mask).to(y.dtype)
        return y

    def _sketch(self, est, mask):
        """The router's estimate of the skipped neurons [T, n] times the int4 down sketch -> [T, d] float32."""
        return _int4_matmul(est.masked_fill(mask, 0), self.prior_a, self.prior_b)

    def _kept(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        t, d = x.shape
        path = self.path
        same = t == 1 or self.select == "topk"   # every row keeps the same count: [T, k] indices exist
        if path == "auto":
            if t == 1 and x.is_cuda and triton is not None:
                path = "triton"
            else:
                path = "gather" if same and t * self.keep * 3 * d <= GATHER_LIMIT else "masked"
        if path == "masked":
            return self._masked(x, mask)
        if not same:
            raise ValueError(f"path {path!r} needs the same kept count per token; use 'masked'")
        idx = mask.nonzero()[:, 1].view(t, -1)                                        # [T, k] sorted
        if idx.shape[1] == 0:                    # threshold selection may keep no neuron: the prior alone
            return self.prior_y0.expand(t, d).clone()
        return {"gather": self._gather, "triton": self._triton}[path](x, idx)

    def _gather(self, x, idx):
        w = self.bundled.index_select(0, idx.reshape(-1)).view(*idx.shape, 3, -1)   # [T, k, 3, d]
        g = torch.einsum("tkd,td->tk", w[:, :, 0], x)
        u = torch.einsum("tkd,td->tk", w[:, :, 1], x)
        h = nn.functional.silu(g) * u - self.prior_c[idx]
        return torch.einsum("tk,tkd->td", h, w[:, :, 2]) + self.prior_y0

    def _masked(self, x, mask):
        b = self.bundled
        h = nn.functional.silu(x @ b[:, 0].T) * (x @ b[:, 1].T) - self.prior_c
        return (h * mask.to(h.dtype)) @ b[:, 2] + self.prior_y0

    def _triton(self, x, idx):
        return _fused_step(x, self.bundled, idx.reshape(-1), self.prior_c, self.prior_y0)


if triton is not None:
    @triton.jit
    def _fused_kernel(x_ptr, w_ptr, idx_ptr, c_ptr, y_ptr, K, D: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        """One program: BLOCK_K kept neurons. Pass 1 dots their gate/up rows with x; pass 2 adds
        (silu(g)*u - c) times their down rows into y (fp32 atomics across programs)."""
        pid = tl.program_id(0)
        ks = pid * BLOCK_K + tl.arange(0, BLOCK_K)
        live = ks < K
        rows = tl.load(idx_ptr + ks, mask=live, other=0).to(tl.int64) * (3 * D)
        g = tl.zeros([BLOCK_K], tl.float32)
        u = tl.zeros([BLOCK_K], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            xv = tl.load(x_ptr + ds).to(tl.float32)
            off = rows[:, None] + ds[None, :]
            wg = tl.load(w_ptr + off, mask=live[:, None], other=0.0).to(tl.float32)
            wu = tl.load(w_ptr + off + D, mask=live[:, None], other=0.0).to(tl.float32)
            g += tl.sum(wg * xv[None, :], axis=1)
            u += tl.sum(wu * xv[None, :], axis=1)
        c = tl.load(c_ptr + tl.load(idx_ptr + ks, mask=live, other=0), mask=live, other=0.0).to(tl.float32)
        h = g / (1.0 + tl.exp(-g)) * u - c
        h = tl.where(live, h, 0.0)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            off = rows[:, None] + 2 * D + ds[None, :]
            wd = tl.load(w_ptr + off, mask=live[:, None], other=0.0).to(tl.float32)
            tl.atomic_add(y_ptr + ds, tl.sum(wd * h[:, None], axis=0))


def _fused_step(x: torch.Tensor, bundled: torch.Tensor, idx: torch.Tensor, c: torch.Tensor,
               y0: torch.Tensor, block_k: int = 16, block_d: int = 256) -> torch.Tensor:
    """One token: x [1, d], bundled [n, 3, d], idx [k] -> y [1, d] (Triton, fp32 accumulation)."""
    d, k = x.shape[-1], idx.numel()
    if d % block_d:
        block_d = 64 if d % 64 == 0 else d
    y = y0.float().clone()
    _fused_kernel[(triton.cdiv(k, block_k),)](x.reshape(-1).contiguous(), bundled, idx.contiguous(), c, y,
                                              k, D=d, BLOCK_K=block_k, BLOCK_D=block_d)
    return y.to(x.dtype).view(1, d)


def attach(model, model_dir: Path, spec) -> None:
    """Replace every layer's MLP by a SparseMLP executing spec.sparse (validated against the model)."""
    install(model, ref.load_for_model(model_dir, spec))


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
    w = [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight.T]
    return SparseMLP(torch.stack([t.detach() for t in w], dim=1).contiguous(), layer)


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
    with torch.inference_mode():
        xt = torch.as_tensor(x, device=mlp.bundled.device, dtype=mlp.bundled.dtype)
        return mlp.route(xt).cpu().numpy()


def sparse_mlp_step(x: np.ndarray, mlp: SparseMLP, path: str = "auto") -> np.ndarray:
    """x [T, d] numpy -> y [T, d] float32 through the backend's sparse MLP (path: auto/gather/masked/triton)."""
    with torch.inference_mode():
        xt = torch.as_tensor(x, device=mlp.bundled.device, dtype=mlp.bundled.dtype)
        old, mlp.path = mlp.path, path
        try:
            return mlp(xt).float().cpu().numpy()
        finally:
            mlp.path = old


def make_mlp(bundled: np.ndarray, layer: ref.LayerSparse, dtype: str = "float32", device: str | None = None):
    """A standalone SparseMLP (tests, benchmarks)."""
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    return SparseMLP(torch.as_tensor(bundled, device=dev).to(dt), layer)
