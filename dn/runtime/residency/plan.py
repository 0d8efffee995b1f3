"""Residency's plan: which MLP blocks stay resident under a budget, and in what order a layer's blocks are kept
(hotness). The bytes are dn.model.store's accounting."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from dn.core import activations
from dn.core.errors import DnError
from dn.formats import gguf_blocks
from dn.formats.dense import Dense
from dn.model import store
from dn.model.spec import DTYPE_BYTES, ModelSpec

BLOCK = 64                      # neurons per block: a multiple of every affine group size and of torch's int4 rows
MODES = ("exact", "sparse", "per-sequence")


@dataclass
class Plan:
    mode: str
    budget: int                  # bytes the process may hold for weights (plus the stated margin)
    dense_bf16: int
    fixed: int                   # everything but the MLP neurons, as held
    side: int                    # sparse mode: routers, thresholds and priors
    block_bytes: int             # one block of BLOCK neurons as held (the mean over layers)
    blocks: int                  # per layer
    layers: int
    hot: list[int] = field(default_factory=list)   # resident blocks per layer
    buffer_blocks: int = 0       # blocks of read buffer (the largest cold run of a layer, times buffers)
    buffers: int = 1             # cold runs held at once: 2 with prefetch (the next layer's, read ahead)
    block: int = BLOCK           # neurons per block (block_size)
    buffer_block_bytes: int = 0  # a block of the read buffer: the largest layer's (a GGUF's layers differ in type)
    cold_embedding: bool = False  # an untied input embedding read a row per token from the file, not held
    span: tuple[int, int] | None = None  # a pipeline rank's layers [lo, hi): the plan is over them only

    def __post_init__(self):
        self.buffer_block_bytes = self.buffer_block_bytes or self.block_bytes

    @property
    def held(self) -> range:
        """The layers this process holds MLPs for: all, or a pipeline rank's span."""
        return range(*self.span) if self.span else range(self.layers)

    @property
    def minimum(self) -> int:
        """No block resident: one layer's blocks read at a time (two with prefetch)."""
        return self.fixed + self.side + self.buffers * self.blocks * self.buffer_block_bytes

    @property
    def resident(self) -> int:
        return self.fixed + self.side + sum(self.hot) * self.block_bytes + self.buffer_blocks * self.buffer_block_bytes

    @property
    def hot_fraction(self) -> float:
        return sum(self.hot) / (self.blocks * len(self.held))

    def summary(self) -> dict:
        return asdict(self) | {"minimum": self.minimum, "resident": self.resident,
                               "hot_fraction": self.hot_fraction}

    def lines(self) -> list[str]:
        mib = lambda n: f"{n / 2**20:.1f} MiB ({100 * n / self.dense_bf16:.1f}% of dense bf16)"
        fixed = "lm_head, attention, norms" if self.cold_embedding else "embedding/lm_head, attention, norms"
        held = [self.hot[i] for i in self.held]
        rank = f", layers {self.held.start}-{self.held.stop - 1} of {self.layers}" if self.span else ""
        return [f"residency plan ({self.mode}{rank}): budget {mib(self.budget)}",
                f"  resident, fixed ({fixed}): {mib(self.fixed)}",
                *([f"  resident, sparse routers and priors: {mib(self.side)}"] if self.side else []),
                f"  resident MLP blocks: {sum(self.hot)} of {self.blocks * len(self.held)} "
                f"({100 * self.hot_fraction:.0f}%, {min(held)}-{max(held)} of {self.blocks} per layer, "
                f"{self.block} neurons each): {mib(sum(self.hot) * self.block_bytes)}",
                f"  read buffer: {self.buffer_blocks} blocks"
                f"{' (this layer and the next, read ahead)' if self.buffers == 2 else ''}: "
                f"{mib(self.buffer_blocks * self.buffer_block_bytes)}",
                f"  planned total: {mib(self.resident)}; minimum for this model: {mib(self.minimum)}",
                "  cold: the other MLP blocks, read from the cold file on demand (what the OS page cache keeps of "
                "it is not counted: it is not the process's memory)",
                *(["  cold: the input embedding's rows, read from the model file per token (untied: the lm_head "
                   "stays resident, every token reads all of it)"] if self.cold_embedding else [])]


def dense_bf16(spec: ModelSpec, stage=None) -> int:
    """The model's weights as dense bf16: what budget percentages are of (a pipeline rank's: its own share)."""
    if stage is None:
        return store.dense_bytes(spec, "bfloat16")
    share = _share(spec, stage)
    return round(sum(Dense.nbytes(e.shape, 2) * share(e) for e in store.entries(spec)))  # as store.dense_bytes


def _share(spec: ModelSpec, stage):
    """stage (dn.runtime.pipeline.Stage) -> the fraction of an entry the rank holds: its own tensors whole, none
    of an embedding it maps (Stage.lookup), of a tied head shared by rows its rows' (Stage.head_rows)."""
    a = spec.architecture
    n, tied, mapped = a.num_hidden_layers, bool(a.tie_word_embeddings), stage.lookup(spec)

    def share(e) -> float:
        if not stage.keeps(e.name, n, tied):
            return 0.0
        if e.name.startswith("model.embed_tokens.") and tied and stage.vocab_split:
            rows = stage.head_rows(a.vocab_size, True)
            return (rows[1] - rows[0]) / a.vocab_size if rows else 0.0
        return 0.0 if e.name in mapped else 1.0
    return share


def block_size(spec: ModelSpec) -> int:
    """Neurons per block: BLOCK, or for a native GGUF folder the least multiple of BLOCK that holds whole blocks of
    every MLP type along the down projection's columns (256 for the k-quants' super-blocks)."""
    size = BLOCK
    for path, kind in (spec.gguf or {}).items():
        if ".mlp." in path:
            size = math.lcm(size, gguf_blocks.TYPES[kind][1])
    return size


def fixed_bytes(spec: ModelSpec, dtype: str, stage=None) -> int:
    """Bytes of everything but the MLP projections and an input embedding read a row per token from the file
    (dn.model.store.mapped: not held), as held at dtype (dn.model.store's accounting). stage: a pipeline rank's
    tensors only (the embedding it only looks up mapped, Stage.lookup)."""
    cold = store.mapped(spec)
    if stage is not None:
        share, b = _share(spec, stage), DTYPE_BYTES[dtype]
        return round(sum(e.nbytes(b) * share(e) for e in store.entries(spec) if e.role != "mlp" and e.name not in cold))
    total = store.resident_bytes(spec, dtype)
    mlp = store.held_bytes(spec, dtype, lambda e: e.role == "mlp" or e.name in cold)
    return total["total"] - total["sparse"] - mlp


def block_bytes(spec: ModelSpec, dtype: str, largest: bool = False) -> int:
    """One block as accounted (dn.model.store), the mean over layers (largest: the largest layer's), for a plan
    made without the cold file (dn footprint --no-measure)."""
    a = spec.architecture
    layers = [store.held_bytes(spec, dtype, lambda e, i=i: e.name.startswith(f"model.layers.{i}.mlp."))
              for i in range(a.num_hidden_layers)]
    per = max(layers) if largest else sum(layers) / len(layers)
    return math.ceil(per * block_size(spec) / a.intermediate_size)


def make_plan(spec: ModelSpec, dtype: str, budget: int, mode: str, block_bytes: int, buffers: int = 1,
              buffer_block_bytes: int | None = None, stage=None) -> Plan:
    """Fill the budget with the hottest blocks, spread evenly over layers (files keep each layer's blocks in
    hotness order, so a layer's resident set is its first `hot` blocks). Raises DnError below the minimum.
    buffers: cold runs held at once (2 when the next layer's is read ahead); buffer_block_bytes: a block of the
    largest layer (default: block_bytes), so that any layer's cold run fits the buffer. stage: a pipeline rank
    (dn.runtime.pipeline.Stage): the plan is over its layers and tensors; the others' hot counts are 0."""
    if mode not in MODES:
        raise DnError(f"unknown residency mode {mode!r} (choose from {', '.join(MODES)})")
    if mode == "sparse" and spec.sparse is None:
        raise DnError("residency mode 'sparse' needs a sparse model (dn convert --sparsity S): this one has no router")
    a = spec.architecture
    size = block_size(spec)
    n_layers, blocks = a.num_hidden_layers, a.intermediate_size // size
    span = stage.span(n_layers) if stage is not None and stage.size > 1 else None
    if span and spec.sparse is not None:
        raise DnError("--max-resident with --pipeline plans dense, quantized and GGUF models; not a sparse one")
    side = spec.sparse["num_layers"] * store.sparse_side(spec.sparse, DTYPE_BYTES[dtype])["held"] \
        if mode == "sparse" else 0
    stage = stage if span else None
    plan = Plan(mode, budget, dense_bf16(spec, stage), fixed_bytes(spec, dtype, stage), side, block_bytes, blocks,
                n_layers, buffers=buffers, block=size, cold_embedding=bool(store.mapped(spec)),
                buffer_block_bytes=buffer_block_bytes or block_bytes, span=span)
    if budget < plan.minimum:
        raise DnError(f"--max-resident {budget / 2**20:.1f} MiB is below this model's minimum of "
                      f"{plan.minimum / 2**20:.1f} MiB ({100 * plan.minimum / plan.dense_bf16:.1f}% of dense bf16: "
                      f"embedding/lm_head, attention, norms{', routers, priors' if side else ''} and "
                      f"{'two layers' if buffers == 2 else 'one layer'}'s MLP read at a time, {dtype})")
    # h resident blocks (B bytes each) in each of L layers and b buffers of (blocks - h) of the largest layer's (M):
    # fixed + side + L h B + b (blocks - h) M
    b, bb, mb, held = buffers, block_bytes, plan.buffer_block_bytes, plan.held
    n, avail = len(held), budget - plan.fixed - side
    plan.hot = [0] * n_layers
    if avail >= n * blocks * bb:
        for i in held:
            plan.hot[i] = blocks
        return plan
    h = max(0, min((avail - b * blocks * mb) // (n * bb - b * mb), blocks - 1)) if n * bb > b * mb else 0
    extra = min((avail - n * h * bb - b * (blocks - h) * mb) // bb, n - 1)  # layers holding one block more
    for k, i in enumerate(held):
        plan.hot[i] = h + 1 if k < extra else h
    plan.buffer_blocks = b * (blocks - h)
    return plan


# ---- hotness ----------------------------------------------------------------------------------------------

def weight_hotness(gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
    """Without calibration text: each neuron's |gate row| |up row| |down column|, a bound on what it can add."""
    return np.linalg.norm(gate, axis=1) * np.linalg.norm(up, axis=1) * np.linalg.norm(down, axis=0)


def activation_hotness(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray,
                        act: str = "silu") -> np.ndarray:
    """On calibration inputs x [T, d]: each neuron's mean |act(g) u| times its down column's norm, i.e. the
    mean size of what it adds to the layer's output (act: the model's, Architecture.mlp_act)."""
    g, u = x @ gate.T, x @ up.T
    a = activations.apply(act, g) * u
    return np.abs(a).mean(0) * np.linalg.norm(down, axis=0)


def block_order(hot: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """Per-neuron hotness [n] -> block ids, hottest first."""
    return np.argsort(-hot.reshape(-1, block).sum(1), kind="stable")
