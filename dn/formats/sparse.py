"""Per-token sparse MLP: the spec (router + prior per layer), its file I/O, the fitting math and the
numpy reference of one sparse MLP step, which both backends are tested against.

A gated MLP is y = D (act(G x) * (U x)) with n neurons, act one of dn/core/activations.py's; below, silu stands
for the layer's act. Per token the router scores every neuron and keeps some of them:
  select "threshold" (v2 default): keep neuron j iff score_j > t_j, t_j = tau / |D[:, j]| (a neuron's
                    score weighted by its down column's norm, i.e. the size of what it would add), tau
                    set per layer on calibration scores so that on average `keep` neurons pass; the
                    count varies per token, which loses less than a fixed count.
  select "topk":    exactly `keep` neurons per token, top-k of the scores (v1 files).
Scores:
  router "int4":    scores s = |silu(g^)| * |u^| with [g^, u^] = [G; U]_q x, where [G; U]_q is a group-wise
                    (GROUP weights per float32 scale) symmetric int4 sketch of the gate and up weights,
                    a quarter of their bf16 bytes; the full-precision gate matrix is never needed to route.
  router "int4gate": scores s = |silu(g^)| from an int4 sketch of the gate alone (half the int4 router's bytes:
                    what a decode step's router costs); the up value's size is folded into the thresholds
                    (t_j = tau / (|D[:, j]| rms_j(U x)) on calibration inputs). No sketch prior (it needs u^).
  router "lowrank": scores s = |silu(g^)| * |u^| where [g^, u^] = (x A) B is a rank-r reduced-rank
                    regression of the gate and up pre-activations on x, fitted on calibration inputs
                    (so the full gate matrix is never needed to route).
  prior "median":   each skipped neuron j adds its calibrated median activation c_j when skipped, i.e.
                    y += D c - D[:, kept] c[kept] = y0 - sum_kept c_j D[:, j]; the kept down rows are
                    gathered anyway, so the prior costs n + d numbers per layer and no matmul over
                    the skipped neurons.
  prior "sketch":   each skipped neuron j adds h^_j D~[:, j], where h^ = silu(g^) * u^ is the router's own
                    (signed) estimate of its activation, already computed to route, and D~ a group-wise
                    int4 sketch of the down matrix (GROUP weights per scale along n): together with the
                    int4 router, an int4 copy of the whole MLP answers for the skipped neurons while the
                    kept ones run in full precision. Costs d (n/2 + 4 n/GROUP) bytes per layer.
  router "planes":  scores s = |silu(g^)| * |u^| with g^, u^ from the gate and up weights' own split planes
                    (dn/formats/planes.py: each weight to within its exponent and top mantissa bit, 6 of its 12
                    bits); the rest of a kept neuron's bits is read only when it is kept. With the sketch prior, D~
                    is the same split of the down matrix. Weights are split as bfloat16 (rounded); the fused C
                    kernel runs on a bfloat16 model, whose weights it checks are the ones split.
  prior "none":     plain dropping.
The neurons' weights are bundled per neuron, bundle[j] = [G[j], U[j], D[:, j]] ([n, 3, d]), so one
contiguous gather fetches everything a kept neuron needs.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from dn.core import activations, tensors
from dn.core.errors import DnError
from dn.formats import native as nat
from dn.formats import planes, quant

VERSION = 2
READS = (1, 2)      # v1: top-k selection only, no router.t
FILE = "dn_sparse.safetensors"
ROUTERS = ("int4", "lowrank", "int4gate", "planes")
INT4 = ("int4", "int4gate")  # the routers held as packed int4 sketches
PRIORS = ("none", "median", "sketch")
SELECTS = ("threshold", "topk")
DEFAULT_SELECT = "threshold"
DEFAULT_ROUTER = "int4"  # portable: the fused Metal and Triton kernels read bundled weights (default_router)
DEFAULT_PRIOR = "sketch"
DEFAULT_RANK = 128
GROUP = 64          # int4 router: weights per scale
DEFAULT_ACT = activations.DEFAULT  # what a file written before GeGLU support runs


@dataclass
class LayerSparse:
    keep: int                 # neurons kept per token
    # lowrank: [d, r]; int4: packed nibbles of [G; U], uint8 [2n, d/2] (int4gate: G's, n rows); planes: the split
    # sketches of [G; U], uint8 [2n, 3d/4]
    router_a: np.ndarray
    # lowrank: [r, 2n] (columns [:n] gate, [n:] up); int4: scales [2n, d/GROUP] (int4gate: n); planes: float32
    # [2, planes.META]
    router_b: np.ndarray
    prior_c: np.ndarray       # [n] activation a skipped neuron is assumed to have (zeros: drop)
    prior_y0: np.ndarray      # [d] D @ prior_c
    router: str = "lowrank"
    select: str = "topk"
    thresh: np.ndarray | None = None   # threshold: [n] per-neuron score thresholds t_j
    prior_a: np.ndarray | None = None  # sketch: packed nibbles of D, uint8 [d, n/2] (planes: D.T's split, [n, 3d/4])
    prior_b: np.ndarray | None = None  # sketch: scales [d, n/GROUP] (planes: float32 [1, planes.META])
    act: str = DEFAULT_ACT             # the MLP's activation (dn.core.activations)


@dataclass
class SparseSpec:
    sparsity: float
    hidden: int
    intermediate: int
    router: str = DEFAULT_ROUTER
    rank: int = DEFAULT_RANK
    prior: str = DEFAULT_PRIOR
    select: str = DEFAULT_SELECT
    act: str = DEFAULT_ACT
    keep: list[int] = field(default_factory=list)          # per layer; threshold: calibrated mean count
    calibration: dict = field(default_factory=dict)
    layers: list[LayerSparse] = field(default_factory=list, repr=False)
    version: int = VERSION

    def section(self) -> dict:
        """The `sparse` section of dn_spec.json (arrays live in FILE)."""
        d = asdict(replace(self, layers=[]))  # lazy layers hold their open file: not deep-copied
        del d["layers"]
        return d | {"file": FILE, "num_layers": len(self.layers)}


def default_router(backend: str, device: str, dense_mlp: bool = True) -> str:
    """The router a conversion fits when none is asked for: "planes" where its C kernels run (torch on a CPU) over
    dense MLP weights (the best quality, the fastest step, the MLP held in 12 bits); DEFAULT_ROUTER elsewhere: on
    Apple and CUDA GPUs, whose fused kernels read bundled weights (planes would run there through plain decodes),
    and over quantized or coded MLPs, which are not held as planes (the 6-bit sketches would outweigh 4-bit
    weights)."""
    return "planes" if backend == "torch" and device == "cpu" and dense_mlp else DEFAULT_ROUTER


def keep_count(sparsity: float, n: int) -> int:
    if not isinstance(sparsity, (int, float)) or not 0 < sparsity < 1:
        raise DnError(f"sparsity must be in (0, 1), got {sparsity!r}")
    return max(1, min(n, round((1 - sparsity) * n)))


# ---- the numpy reference -------------------------------------------------------------------------

def bundle(gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
    """gate, up [n, d], down [d, n] -> [n, 3, d], one contiguous block per neuron."""
    return np.ascontiguousarray(np.stack([gate, up, down.T], axis=1))


def quantize_int4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w [m, d] -> (packed uint8 [m, d/2], low nibble first; scales float32 [m, d/GROUP]); symmetric, values -7..7."""
    packed, scales, _ = quant.quantize_symmetric(w, 4, GROUP)
    return packed.view(np.uint8), scales


def dequantize_int4(packed: np.ndarray, s: np.ndarray) -> np.ndarray:
    return quant.dequantize_symmetric(packed, s, 4, GROUP)


def predict(x: np.ndarray, layer: LayerSparse) -> np.ndarray:
    """x [T, d] -> predicted [gate, up] pre-activations [T, 2n] (float32; int4gate: the gate's, [T, n])."""
    x = x.astype(np.float32)
    if layer.router in INT4:
        return x @ dequantize_int4(layer.router_a, layer.router_b).T
    if layer.router == "planes":
        return x @ planes.stacked_values(layer.router_a, layer.router_b, x.shape[1]).T
    return (x @ layer.router_a) @ layer.router_b


def sketch_matrix(layer: LayerSparse) -> np.ndarray:
    """The sketch prior's down matrix D~ [d, n], float32 (int4, or the planes router's split of D)."""
    if layer.router == "planes":
        return planes.stacked_values(layer.prior_a, layer.prior_b, layer.prior_y0.shape[0]).T
    return dequantize_int4(layer.prior_a, layer.prior_b)


def estimate(x: np.ndarray, layer: LayerSparse) -> np.ndarray:
    """x [T, d] -> the router's estimate of every neuron's activation act(g^) * u^, [T, n] (float32; int4gate:
    act(g^), the up value's size being in the thresholds)."""
    n = layer.prior_c.shape[0]
    p = predict(x, layer)
    if layer.router == "int4gate":
        return activations.apply(layer.act, p)
    return activations.apply(layer.act, p[:, :n]) * p[:, n:]


def scores(x: np.ndarray, layer: LayerSparse) -> np.ndarray:
    """x [T, d] -> router scores [T, n] (float32)."""
    return np.abs(estimate(x, layer))


def route_mask(x: np.ndarray, layer: LayerSparse) -> np.ndarray:
    """x [T, d] -> kept neurons as a bool mask [T, n] (threshold: s > t; topk: top-`keep`, ties: lower index)."""
    s = scores(x, layer)
    if layer.select == "threshold":
        return s > layer.thresh
    idx = np.argsort(-s, axis=1, kind="stable")[:, :layer.keep]
    mask = np.zeros(s.shape, bool)
    np.put_along_axis(mask, idx, True, axis=1)
    return mask


def sparse_mlp_step(x: np.ndarray, bundled: np.ndarray, layer: LayerSparse,
                    mask: np.ndarray | None = None) -> np.ndarray:
    """x [T, d], bundled [n, 3, d] -> y [T, d] (float64 accumulation: the oracle for both backends)."""
    mask = route_mask(x, layer) if mask is None else mask
    x64, w = x.astype(np.float64), bundled.astype(np.float64)
    y = np.empty(x.shape, np.float64)
    for t in range(len(x)):                                # per token: only its kept neurons are read
        k = np.flatnonzero(mask[t])
        g, u = w[k, 0] @ x64[t], w[k, 1] @ x64[t]
        h = activations.apply(layer.act, g) * u - layer.prior_c[k]  # prior: subtract the kept neurons' c
        y[t] = h @ w[k, 2] + layer.prior_y0
    if layer.prior_a is not None:                          # sketch: the router's estimate of the skipped
        est = np.where(mask, 0, estimate(x, layer)).astype(np.float64)
        y += est @ sketch_matrix(layer).astype(np.float64).T
    return y


def dense_mlp(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray,
              name: str = DEFAULT_ACT) -> np.ndarray:
    return (activations.apply(name, x @ gate.T) * (x @ up.T)) @ down.T


# ---- fitting (numpy, on calibration MLP inputs) --------------------------------------------------

def fit_router(x: np.ndarray, gate: np.ndarray, up: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Reduced-rank regression of [G x, U x] on x: the best rank-r predictor on the calibration inputs.

    With Y = X W S^-1 (W = [G; U]^T [d, 2n], S the RMS of each output so the gate and up halves weigh
    alike), the optimum is W S^-1 V_r V_r^T S for V_r the top-r right singular vectors of Y, which are
    those of L^T W S^-1 where X^T X = L L^T ([d, d]; no [T, 2n] product needed).
    """
    w = np.concatenate([gate, up], axis=0).T.astype(np.float64)   # [d, 2n]
    x64 = x.astype(np.float64)
    cov = x64.T @ x64 / len(x64)
    evals, evecs = np.linalg.eigh(cov)
    half = evecs * np.sqrt(np.clip(evals, 0, None))                # cov = half half^T
    scale = np.sqrt(((cov @ w) * w).sum(0)) + 1e-6     # RMS of each output
    _, _, vt = np.linalg.svd(half.T @ (w / scale), full_matrices=False)
    v = vt[:rank].T                                                # [2n, r]
    a = (w / scale) @ v                                            # [d, r]
    b = v.T * scale                                                # [r, 2n]
    return a.astype(np.float32), b.astype(np.float32)


def fit_prior(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray, layer: LayerSparse,
              kind: str) -> None:
    """Fill layer.prior_c / prior_y0: median activation of each neuron over the tokens where it is skipped
    (a median, since a few outlier tokens, e.g. the first of a window, dominate a mean)."""
    n = gate.shape[0]
    if kind in ("none", "sketch"):
        layer.prior_c, layer.prior_y0 = np.zeros(n, np.float32), np.zeros(down.shape[0], np.float32)
        if kind == "sketch" and layer.router == "planes":  # the split of D's columns, one row per neuron
            sk, meta, _ = planes.split_float(np.ascontiguousarray(down.T))
            layer.prior_a, layer.prior_b = sk, meta[None]
        elif kind == "sketch":
            if n % GROUP:
                raise DnError(f"sketch prior needs an intermediate size divisible by {GROUP}, got {n}")
            layer.prior_a, layer.prior_b = quantize_int4(np.ascontiguousarray(down, np.float32))
        return
    if kind != "median":
        raise DnError(f"unknown prior {kind!r} (choose from {', '.join(PRIORS)})")
    h = activations.apply(layer.act, x @ gate.T) * (x @ up.T)  # [T, n]
    skipped = ~route_mask(x, layer)
    with warnings.catch_warnings():  # a neuron never skipped has no median: c = 0
        warnings.simplefilter("ignore", RuntimeWarning)
        c = np.nan_to_num(np.nanmedian(np.where(skipped, h, np.nan), axis=0))
    layer.prior_c = c.astype(np.float32)
    layer.prior_y0 = (down.astype(np.float64) @ c).astype(np.float32)


def fit_threshold(x: np.ndarray, down: np.ndarray, layer: LayerSparse, up: np.ndarray | None = None) -> np.ndarray:
    """Per-neuron thresholds t_j = tau / |D[:, j]|, tau the (1 - keep/n) quantile of the norm-weighted
    router scores over the calibration tokens: on those tokens `keep` neurons pass on average. int4gate
    (scores without the up value): t_j = tau / (|D[:, j]| rms_j(U x)), the up value's typical size."""
    norm = np.linalg.norm(down.astype(np.float64), axis=0) + 1e-12          # [n]
    if layer.router == "int4gate":
        norm = norm * (np.sqrt(np.mean(np.square(x.astype(np.float64) @ up.T.astype(np.float64)), axis=0)) + 1e-12)
    weighted = scores(x, layer) * norm
    tau = np.quantile(weighted, 1 - layer.keep / len(norm), method="lower")
    return (tau / norm).astype(np.float32)


def fit_layer(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray, keep: int,
              rank: int, prior: str, router: str = DEFAULT_ROUTER, select: str = DEFAULT_SELECT,
              name: str = DEFAULT_ACT) -> LayerSparse:
    """x [T, d] calibration MLP inputs of one layer (float32) -> its fitted router, selection and prior."""
    n, d = gate.shape
    if router in INT4:
        if d % GROUP:
            raise DnError(f"int4 router needs hidden size divisible by {GROUP}, got {d}")
        if router == "int4gate" and prior == "sketch":
            raise DnError("the sketch prior needs the router's up estimate: use router int4 with it")
        a, b = quantize_int4(np.concatenate([gate, up]) if router == "int4" else gate)
    elif router == "planes":
        planes.check_width(d)
        a, b, _ = planes.stack([planes.split_float(w) for w in (gate, up)])
    elif router == "lowrank":
        a, b = fit_router(x, gate, up, rank)
    else:
        raise DnError(f"unknown router {router!r} (choose from {', '.join(ROUTERS)})")
    if select not in SELECTS:
        raise DnError(f"unknown selection {select!r} (choose from {', '.join(SELECTS)})")
    layer = LayerSparse(keep, a, b, np.zeros(n, np.float32), np.zeros(d, np.float32), router, select,
                        act=activations.check(name))
    if select == "threshold":
        layer.thresh = fit_threshold(x, down, layer, up)
    fit_prior(x, gate, up, down, layer, prior)
    return layer


def oracle_mask(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray, counts: np.ndarray,
                name: str = DEFAULT_ACT) -> np.ndarray:
    """Per token t, the counts[t] neurons with the largest true |act(G x) * U x| * |D[:, j]|: the best any
    router keeping that many can do. Bool [T, n]."""
    h = np.abs(activations.apply(name, x @ gate.T) * (x @ up.T)) * np.linalg.norm(down, axis=0)
    order = np.argsort(-h, axis=1, kind="stable")
    mask = np.zeros(h.shape, bool)
    np.put_along_axis(mask, order, np.arange(h.shape[1])[None] < np.asarray(counts)[:, None], axis=1)
    return mask


def recall(mask: np.ndarray, ref: np.ndarray) -> float:
    """Fraction of the oracle's kept neurons the router kept too (bool masks [T, n])."""
    return float((mask & ref).sum() / max(1, ref.sum()))


# ---- the C kernel over bundles (dn/formats/csrc/sparse.c); backends pass their own memory ------------------

def native():
    """dn/formats/csrc/sparse.c with its signatures set, or None (DN_NATIVE=0, no compiler): then the plain
    paths run."""
    lib = nat.library("sparse")  # built and loaded once
    if lib is not None and not hasattr(lib, "dn_ready"):
        i64, p, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        for f in (lib.dn_sparse_kept_bf16, lib.dn_sparse_kept_f32):
            f.argtypes, f.restype = [p, p, p, i64, i64, i64, p, p, i32, i32], None
        lib.dn_ready = True
    return lib


# ---- files ---------------------------------------------------------------------------------------

def save(spec: SparseSpec, out_dir: Path) -> dict:
    """Write FILE into out_dir; return the section for dn_spec.json."""
    arrays = {}
    for i, layer in enumerate(spec.layers):
        p = f"layers.{i}."
        arrays |= {p + "router.a": layer.router_a, p + "router.b": layer.router_b,
                   p + "prior.c": layer.prior_c, p + "prior.y0": layer.prior_y0}
        if layer.select == "threshold":
            arrays[p + "router.t"] = layer.thresh
        if layer.prior_a is not None:
            arrays |= {p + "prior.a": layer.prior_a, p + "prior.b": layer.prior_b}
    tensors.save({k: np.ascontiguousarray(v if v.dtype == np.uint8 else v.astype(np.float32))
                  for k, v in arrays.items()},
                 Path(out_dir) / FILE, metadata={"dn_sparse_version": str(VERSION)})
    return spec.section()


def load(model_dir: Path, section: dict, num_layers: int, hidden: int, intermediate: int,
         lazy: bool = False) -> SparseSpec:
    """Read and validate a sparse section + FILE against the model's shape; DnError on any mismatch. lazy: the
    layers are read from the file one at a time when asked for (a loader then holds one layer's, not the file)."""
    if not isinstance(section, dict):
        raise DnError("sparse section of dn_spec.json is not an object")
    version = section.get("version")
    if version not in READS:
        raise DnError(f"unsupported sparse spec version {version!r} (this dn reads {', '.join(map(str, READS))})")
    select = section.get("select", "topk") if version >= 2 else "topk"
    if select not in SELECTS:
        raise DnError(f"sparse spec: unknown selection {select!r}")
    for key, want in (("num_layers", num_layers), ("hidden", hidden), ("intermediate", intermediate)):
        if section.get(key) != want:
            raise DnError(f"sparse spec {key} is {section.get(key)!r}, the model has {want}")
    if section.get("router") not in ROUTERS or section.get("prior") not in PRIORS:
        raise DnError(f"sparse spec: unknown router/prior {section.get('router')!r}/{section.get('prior')!r}")
    act_name = activations.check(section.get("act", DEFAULT_ACT), "sparse spec: ")
    keep = section.get("keep")
    if not isinstance(keep, list) or len(keep) != num_layers or not all(
            isinstance(k, int) and 0 < k <= intermediate for k in keep):
        raise DnError("sparse spec: keep must list one count in [1, intermediate] per layer")
    path = Path(model_dir) / section.get("file", FILE)
    if not path.is_file():
        raise DnError(f"sparse spec file {path} is missing")
    f = tensors.File(path)  # the file's one open: its header here, every layer read through it
    try:
        layers = _layers(f, section, num_layers, hidden, intermediate, select, keep, act_name)
    except BaseException:
        f.close()
        raise
    fields = {k: section[k] for k in ("sparsity", "hidden", "intermediate", "router", "rank", "prior",
                                      "keep", "calibration") if k in section}
    if not lazy:
        with f:
            layers = list(layers)
    return SparseSpec(**fields, select=select, act=act_name, layers=layers, version=version)


def _layers(f: tensors.File, section: dict, num_layers: int, hidden: int, intermediate: int, select: str,
            keep: list[int], act_name: str) -> _Layers:
    """The layers of an open sparse file, once its header holds every tensor the section needs at its shape."""
    r, kind = section.get("rank"), section["router"]
    shapes = {"router.a": (hidden, r), "router.b": (r, 2 * intermediate), "prior.c": (intermediate,),
              "prior.y0": (hidden,)}
    if kind in INT4:
        m = 2 * intermediate if kind == "int4" else intermediate
        shapes |= {"router.a": (m, hidden // 2), "router.b": (m, hidden // GROUP)}
        if kind == "int4gate" and section["prior"] == "sketch":
            raise DnError("sparse spec: the sketch prior needs router int4, not int4gate")
    if kind == "planes":
        shapes |= {"router.a": (2 * intermediate, 3 * hidden // 4), "router.b": (2, planes.META)}
    if select == "threshold":
        shapes["router.t"] = (intermediate,)
    if section["prior"] == "sketch" and kind == "planes":
        shapes |= {"prior.a": (intermediate, 3 * hidden // 4), "prior.b": (1, planes.META)}
    elif section["prior"] == "sketch":
        shapes |= {"prior.a": (hidden, intermediate // 2), "prior.b": (hidden, intermediate // GROUP)}
    for i in range(num_layers):
        for name, shape in shapes.items():
            info = f.header.get(f"layers.{i}.{name}")
            if info is None or tuple(info["shape"]) != shape:
                raise DnError(f"{f.path.name}: layers.{i}.{name} is "
                              f"{'missing' if info is None else tuple(info['shape'])}, expected {shape}")
    return _Layers(f, list(shapes), keep, kind, select, act_name)


class _Layers(Sequence):
    """The layers of a sparse file, layer i read from it (plain reads, not a mapping) each time it is asked for,
    through the one File that read its header; the file closes with this object."""

    def __init__(self, f: tensors.File, names: list[str], keep: list[int], kind: str, select: str, name: str):
        self.file, self.names, self.keep, self.kind, self.select, self.act = f, names, keep, kind, select, name

    def __del__(self):
        self.file.close()

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        got = {n: self.file.read(f"layers.{i}.{n}") for n in self.names}
        got = {n: a if a.dtype == np.uint8 else a.astype(np.float32, copy=False) for n, a in got.items()}
        return LayerSparse(self.keep[i], got["router.a"], got["router.b"], got["prior.c"], got["prior.y0"],
                           self.kind, self.select, got.get("router.t"), got.get("prior.a"), got.get("prior.b"),
                           self.act)


def load_for_model(model_dir: Path, spec, lazy: bool = False) -> SparseSpec:
    """The SparseSpec of a dn ModelSpec (spec.sparse), checked against its architecture."""
    a = spec.architecture
    return load(model_dir, spec.sparse, a.num_hidden_layers, a.hidden_size, a.intermediate_size, lazy)


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def dumps(section: dict) -> str:
    return json.dumps(section, sort_keys=True)
