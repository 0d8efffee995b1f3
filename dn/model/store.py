"""The weight store: where each weight of a model lives and in what format, as plain data, and the one
function that accounts for the bytes a backend holds resident for it.

Formats: `dense` (the compute dtype), `lossless` (dn/formats/lossless.py: entropy-coded; held as dn/formats/fixed4.py,
decoded
into one scratch buffer), `affine` (dn/formats/quant.py: mlx-lm's group quantization, kept packed). A sparse section
(dn/formats/sparse.py) adds side data per layer: the router, its thresholds and the prior. Backends build each
weight in its format (dn_<backend>.quant, dn_<backend>.codec) and run them through their ops; the sparse
MLP asks them for whole matrices or for kept neurons' rows (dn/runtime/sparse_mlp.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dn.formats import fixed4 as codec_runtime
from dn.formats import quant, sparse
from dn.model.spec import DTYPE_BYTES, ModelSpec

FORMATS = ("dense", "lossless", "affine")


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]          # the dense shape
    role: str
    format: str = "dense"
    bits: int | None = None         # affine only
    group_size: int | None = None
    scale_bytes: int | None = None  # affine: bytes of a stored scale or bias (kept so when below the compute dtype)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def entries(spec: ModelSpec) -> list[Entry]:
    """One entry per weight of the model, in its stored format."""
    coded = set(spec.codec["coded_tensors"]) if spec.codec else set()
    stored = {t.name: DTYPE_BYTES[t.dtype] for t in spec.tensors}
    out = []
    for t, shape, q in quant.dense_tensors(spec.quant, spec.tensors):
        if q:
            scale = stored.get(t.name.removesuffix(".weight") + ".scales", 4)
            out.append(Entry(t.name, tuple(shape), t.role, "affine", q["bits"], q["group_size"], scale))
        else:
            out.append(Entry(t.name, tuple(shape), t.role, "lossless" if t.name in coded else "dense"))
    return out


def resident_bytes(spec: ModelSpec, dtype: str) -> dict[str, int]:
    """Bytes a backend holds for the model's weights at the compute dtype, by part; `total` is what
    `resident_weight_bytes` reports everywhere.
    - dense: numel x dtype; affine: packed codes + a scale and a bias per group, at the compute dtype or as
      stored when that is smaller (16-bit scales are exact in float32 arithmetic);
    - lossless: the runtime layout the stored code is converted to at load (dn.formats.fixed4, escapes not
      counted) and decode scratch for the largest coded projection at the compute dtype;
    - sparse: each layer's router, thresholds and prior (sparse_side); with router "planes" at bf16, the MLPs
      held as split planes in place of their dense bytes (split_mlp_bytes)."""
    b = DTYPE_BYTES[dtype]
    parts = dict.fromkeys(("dense", "affine", "lossless", "sparse"), 0)
    for e in entries(spec):
        if e.format != "lossless":
            parts[e.format] += entry_bytes(e, b)
    if spec.codec:
        coded = set(spec.codec["coded_tensors"])
        numel = {t.name: t.numel for t in spec.tensors}
        scratch = max(numel[k] for k in coded)  # torch decodes one projection at a time into it
        parts["lossless"] = sum(codec_runtime.resident_bytes(numel[k]) for k in coded) + scratch * b
    if spec.sparse:  # routers, thresholds and priors ride beside all the weights (no offload yet)
        parts["sparse"] = spec.sparse["num_layers"] * sparse_side(spec.sparse, b)["held"]
        if spec.sparse["router"] == "planes" and dtype == "bfloat16" and mlp_dense(spec):  # held as split planes
            held = split_mlp_bytes(spec.sparse)
            parts["dense"] -= spec.sparse["num_layers"] * held["dense_mlp"]
            parts["sparse"] += spec.sparse["num_layers"] * held["rest"] + held["scratch"]
    return parts | {"total": sum(parts.values())}


def mlp_dense(spec: ModelSpec) -> bool:
    """The MLP weights are dense (neither quantized nor coded): the loaders bundle them, and a sparse layer of
    router "planes" holds them split."""
    return all(e.format == "dense" for e in entries(spec) if e.role == "mlp")


def split_mlp_bytes(section: dict) -> dict[str, int]:
    """A layer of router "planes" at bf16 holds its MLP as split planes (dn/formats/planes.py): beside the sketches the
    sparse section holds (sparse_side), per layer `rest` (the rests of gate, up and down, their escape row offsets
    and tables; the down's sketch too without the sketch prior; the rare escapes not counted) instead of
    `dense_mlp` (the bf16 weights), and once `scratch`: one bf16 matrix the plain paths (prefill) decode each into
    in turn."""
    d, n = section["hidden"], section["intermediate"]
    rest = 3 * (n * 3 * d // 4 + 8 * n) + (_planes_sketch(n, d) if section.get("prior") != "sketch" else 0)
    return {"rest": rest, "dense_mlp": 3 * n * d * 2, "scratch": n * d * 2}


def _planes_sketch(n: int, d: int) -> int:
    """A matrix [n, d]'s split-plane sketch as held: 6 bits a weight, its two 128-byte tables, a row offset."""
    return n * 3 * d // 4 + 256 + 8


def entry_bytes(e: Entry, dtype_bytes: int) -> int:
    """Bytes a dense or affine entry is held in at a compute dtype of dtype_bytes (lossless: see resident_bytes)."""
    if e.format == "affine":
        return quant.quantized_bytes(e.shape[0], e.numel // e.shape[0], e.bits, e.group_size,
                                     min(dtype_bytes, e.scale_bytes))
    return e.numel * dtype_bytes


def sparse_side(section: dict, dtype_bytes: int) -> dict[str, int]:
    """Per layer, the bytes a sparse section holds as both backends keep them: `router` (int4 packed, 4 bits + a
    scale and a bias per GROUP at the compute dtype; split-plane sketches of gate and up, 6 bits a weight; or the
    lowrank factors in float32), `thresh` (float32 per
    neuron), `prior` (what the prior kind itself needs: the median's c and y0 at the compute dtype, the
    sketch's packed int4 down matrix), `zeros` (the c and y0 the runtime holds as zeros for the other
    priors); `held` sums them. For scale: one neuron's bundle and the dense MLP at that dtype."""
    d, n, r = section["hidden"], section["intermediate"], section.get("rank", sparse.DEFAULT_RANK)
    kind = section.get("prior")
    int4 = {"int4": 2 * n, "int4gate": n}.get(section["router"])  # rows of the packed router
    split = section["router"] == "planes"  # split-plane sketches of gate and up (_planes_sketch)
    router = (_int4(int4, d, dtype_bytes) if int4 else 2 * _planes_sketch(n, d) if split
              else (d * r + r * 2 * n) * 4)
    sketch = _planes_sketch(n, d) if split else _int4(d, n, dtype_bytes)
    out = {"router": router,
           "thresh": 4 * n if section.get("select", "topk") == "threshold" else 0,
           "prior": {"median": (n + d) * dtype_bytes, "sketch": sketch}.get(kind, 0),
           "zeros": 0 if kind == "median" else (n + d) * dtype_bytes}
    return out | {"held": sum(out.values()), "neuron": 3 * d * dtype_bytes, "dense_mlp": 3 * d * n * dtype_bytes}


def _int4(rows: int, cols: int, dtype_bytes: int) -> int:
    """dn's int4 sketch (sparse.quantize_int4) as held: affine 4-bit, a scale and a bias per GROUP at the
    compute dtype."""
    return quant.quantized_bytes(rows, cols, 4, sparse.GROUP, dtype_bytes)
