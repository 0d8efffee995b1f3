"""The weight store: where each weight of a model lives and in what format, as plain data, and the one
accounting of the bytes a backend holds resident for it (each format object's nbytes, dn/formats/).

Formats: `dense` (the compute dtype), `lossless` (dn/formats/lossless.py: entropy-coded; held as
dn/formats/fixed4.py, decoded into one scratch buffer), `affine` (dn/formats/quant.py: mlx-lm's group quantization,
kept packed), `gguf` (dn/formats/gguf_blocks.py: a GGUF's blocks as the file has them). A sparse section
(dn/formats/sparse.py) adds side data per layer: the router, its thresholds and the prior, and with router "planes"
holds the MLPs as split planes (dn/formats/planes.py). Backends build each weight
in its format (dn_<backend>.quant, dn_<backend>.codec) and run them through their ops; the sparse MLP asks them
for whole matrices or for kept neurons' rows (dn/runtime/sparse_mlp.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dn import formats
from dn.formats import gguf_blocks, quant, sparse
from dn.formats.dense import Dense
from dn.formats.planes import Planes
from dn.formats.quant import Affine
from dn.model.spec import DTYPE_BYTES, ModelSpec


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]          # the dense shape
    role: str
    format: str = "dense"
    params: dict = field(default_factory=dict)  # the format's (affine: bits, group_size, scale_bytes)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def nbytes(self, dtype_bytes: int) -> int:
        """Bytes held for this weight at a compute dtype of dtype_bytes (a decode scratch aside)."""
        return formats.get(self.format).nbytes(self.shape, dtype_bytes, **self.params)


def entries(spec: ModelSpec) -> list[Entry]:
    """One entry per weight of the model, in its stored format."""
    coded = set(spec.codec["coded_tensors"]) if spec.codec else set()
    stored = {t.name: DTYPE_BYTES[t.dtype] for t in spec.tensors}
    out = []
    blocks = spec.gguf or {}
    for t, shape, q in quant.dense_tensors(spec.quant, spec.tensors):
        kind = blocks.get(t.name.removesuffix(".weight")) if t.name.endswith(".weight") else None
        if kind:
            out.append(Entry(t.name, tuple(gguf_blocks.dense_shape(shape, kind)), t.role, "gguf", {"type": kind}))
        elif q:
            scale = stored.get(t.name.removesuffix(".weight") + ".scales", 4)
            params = {"bits": q["bits"], "group_size": q["group_size"], "scale_bytes": scale}
            out.append(Entry(t.name, tuple(shape), t.role, "affine", params))
        else:
            out.append(Entry(t.name, tuple(shape), t.role, "lossless" if t.name in coded else "dense"))
    return out


def mapped(spec: ModelSpec) -> set[str]:
    """Stored tensors a backend maps from the file instead of reading, where it can (torch on a CPU): a native GGUF
    folder's untied input embedding. A token reads one row of it, so the rest need never be in memory; a tied one
    is the lm_head too, read whole every token."""
    if not spec.gguf or "model.embed_tokens" not in spec.gguf or spec.architecture.tie_word_embeddings:
        return set()
    return {"model.embed_tokens.weight"}


def held_bytes(spec: ModelSpec, dtype: str, keep=None) -> int:
    """Bytes held at dtype for the weights keep(entry) selects (all by default), decode scratch aside."""
    b = DTYPE_BYTES[dtype]
    return sum(e.nbytes(b) for e in entries(spec) if keep is None or keep(e))


def dense_bytes(spec: ModelSpec, dtype: str) -> int:
    """The model's weights dense at dtype (dense bf16: what budget percentages are of)."""
    return sum(Dense.nbytes(e.shape, DTYPE_BYTES[dtype]) for e in entries(spec))


def resident_bytes(spec: ModelSpec, dtype: str) -> dict[str, int]:
    """Bytes a backend holds for the model's weights at the compute dtype, by part; `total` is what
    `resident_weight_bytes` reports everywhere.
    - each weight as its format holds it (nbytes): dense numel x dtype; affine packed codes + a scale and a bias
      per group, at the compute dtype or as stored when that is smaller (16-bit scales are exact in float32
      arithmetic); lossless the runtime layout the stored code is converted to at load (dn.formats.fixed4,
      escapes not counted);
    - once per format held coded (scratch): decode scratch for its largest weight at the compute dtype;
    - sparse: each layer's router, thresholds and prior (sparse_side); with router "planes" at bf16, the MLPs
      held as split planes in place of their dense bytes (split_mlp_bytes)."""
    b = DTYPE_BYTES[dtype]
    parts = dict.fromkeys(("dense", "affine", "gguf", "lossless", "sparse"), 0)
    scratch = {}
    for e in entries(spec):
        parts[e.format] += e.nbytes(b)
        if formats.get(e.format).scratch:  # torch decodes one weight at a time into it
            scratch[e.format] = max(scratch.get(e.format, 0), e.numel * b)
    for fmt, n in scratch.items():
        parts[fmt] += n
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
    """A layer of router "planes" at bf16 holds its MLP as split planes (Planes): beside the sketches the sparse
    section holds (sparse_side), per layer `rest` (the rests of gate, up and down; the down's sketch too without
    the sketch prior) instead of `dense_mlp` (the bf16 weights), and once `scratch`: one bf16 matrix the plain
    paths (prefill) decode each into in turn."""
    shape = (section["intermediate"], section["hidden"])
    rest = 3 * Planes.nbytes(shape, part="rest") + (Planes.nbytes(shape, part="sketch")
                                                     if section.get("prior") != "sketch" else 0)
    return {"rest": rest, "dense_mlp": 3 * Dense.nbytes(shape, 2), "scratch": Dense.nbytes(shape, 2)}


def sparse_side(section: dict, dtype_bytes: int) -> dict[str, int]:
    """Per layer, the bytes a sparse section holds as both backends keep them: `router` (int4 packed, 4 bits + a
    scale and a bias per GROUP at the compute dtype; split-plane sketches of gate and up; or the lowrank factors
    in float32), `thresh` (float32 per neuron), `prior` (what the prior kind itself needs: the median's c and y0 at
    the compute dtype, the sketch's packed int4 down matrix or down's split-plane sketch), `zeros` (the c and y0
    the runtime holds as zeros for the other priors); `held` sums them. For scale: one neuron's bundle and the
    dense MLP at that dtype."""
    d, n, r = section["hidden"], section["intermediate"], section.get("rank", sparse.DEFAULT_RANK)
    kind = section.get("prior")
    int4 = lambda rows, cols: Affine.nbytes((rows, cols), dtype_bytes, 4, sparse.GROUP)  # sparse.quantize_int4
    planes = Planes.nbytes((n, d), part="sketch")  # the split-plane sketch of gate, up or down
    split, rows = section["router"] == "planes", {"int4": 2 * n, "int4gate": n}.get(section["router"])
    router = int4(rows, d) if rows else 2 * planes if split else Dense.nbytes((d, r), 4) + Dense.nbytes((r, 2 * n), 4)
    out = {"router": router,
           "thresh": 4 * n if section.get("select", "topk") == "threshold" else 0,
           "prior": {"median": (n + d) * dtype_bytes, "sketch": planes if split else int4(d, n)}.get(kind, 0),
           "zeros": 0 if kind == "median" else (n + d) * dtype_bytes}
    return out | {"held": sum(out.values()), "neuron": 3 * d * dtype_bytes, "dense_mlp": 3 * d * n * dtype_bytes}
