"""Residency: a memory budget the runtime keeps. The MLP neurons of each layer are cut into blocks of BLOCK
neurons ([gate rows | up rows | down columns], the layout of one block as the backend computes on it); the
hottest blocks stay resident, the rest live in a cold file read on demand. Everything else (embedding and
lm_head, attention, norms, a sparse model's routers and priors) stays resident in its stored format.

This package is the policy, the same on every backend: the budget (dn.runtime.budget), the planner (plan.py), the
cold file (cold.py: written once per model, backend layout and dtype; a checksum per block, checked on every read)
and the resident MLP's logic in its three modes (mlp.py); here, the model-wide runtime, building the cold file and
the CLI flags. `dn_<backend>.resident` only lays a block out and joins blocks into a part it computes on.

Modes (one cold file serves all three):
- exact: every block is used; cold ones are read per token (one read per layer: the cold blocks of a layer
  are contiguous, in hotness order). Same model as fully resident; sums run hot part + cold part.
- sparse: a sparse folder's router keeps neurons per token; the cold blocks holding kept neurons are read;
  its prior answers for the skipped ones.
- per-sequence (GRIFFIN): a multi-token call (the prompt) runs exact and scores each block by its
  activations there; the top blocks become the layer's resident set until the next prompt, and the prompt's
  mean activation of the other neurons answers for them (a constant per layer). Nothing is read per token.

What the OS page cache holds of the cold file is not the process's memory: budgets and measured figures are
the process's own (as in LLM in a Flash); `drop_cache` evicts the file for flash-like reads.
"""

from __future__ import annotations

import contextlib
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from dn import formats
from dn.core import tensors
from dn.core.errors import DnError
from dn.core.files import one_at_a_time
from dn.formats import gguf_blocks
from dn.model.spec import ModelSpec, weight_files
from dn.runtime import calibrate
from dn.runtime.residency.cold import COLD, FOLDER, INDEX, VERSION, ColdTier, fingerprint, folder, split, write_cold
from dn.runtime.residency.mlp import ResidentMLP, part_info
from dn.runtime.residency.plan import (
    BLOCK,
    MODES,
    Plan,
    activation_hotness,
    block_bytes,
    block_order,
    block_size,
    dense_bf16,
    fixed_bytes,
    make_plan,
    weight_hotness,
)

PROMPT_SHARE = 4    # per-sequence eval: the first ctx / PROMPT_SHARE tokens of a window are its prompt

__all__ = ["BLOCK", "COLD", "FOLDER", "INDEX", "MODES", "PROMPT_SHARE", "VERSION", "ColdTier", "Plan", "ResidentMLP",
           "Runtime", "activation_hotness", "add_args", "block_bytes", "block_order", "block_size", "block_slices",
           "build", "dense_bf16", "fields", "fingerprint", "fixed_bytes", "folder", "load_args", "make_plan",
           "mlp_names", "open_runtime", "weight_hotness", "write_cold"]


def mlp_names(i: int) -> tuple[str, str, str]:
    return tuple(f"model.layers.{i}.mlp.{p}_proj" for p in ("gate", "up", "down"))


class Runtime:
    """The model-wide side of residency: the plan, the cold tier, counters and prefetch; R is the backend's
    `resident` module (dn.runtime.backend.Backend.resident)."""

    def __init__(self, tier: ColdTier, plan: Plan, R, prefetch: bool = False):
        self.tier, self.plan, self.R, self.prefetch = tier, plan, R, prefetch
        self.tokens, self.hits, self.misses = 0, 0, 0
        self.prompt_tokens = None          # per-sequence eval: a window's prompt length
        self._next = {}                    # layer -> the Future of its prefetch
        self.joins = getattr(R, "JOIN_IN_WORKER", False)  # the prefetch worker joins the blocks it reads too
        self._pool = None
        self.mlps = []

    def count(self, layer: int, tokens: int) -> None:
        if layer == self.plan.held.start:
            self.tokens += tokens
        if self.plan.mode == "exact":
            cold = self.plan.blocks - self.plan.hot[layer]
            self.hits += self.plan.hot[layer]
            self.misses += cold

    def prefetch_next(self, layer: int) -> None:
        """Exact mode: read (map and checksum) the next layer's cold blocks on a worker thread while this layer
        computes; the page faults and the checksum pass then overlap the compute (they release the GIL). Where the
        backend joins blocks off its main thread (R.JOIN_IN_WORKER), the worker lays them out too."""
        if not self.prefetch:
            return
        held = self.plan.held
        nxt = held.start + (layer + 1 - held.start) % len(held)
        start = self.plan.hot[nxt]
        if start >= self.plan.blocks or nxt in self._next:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="dn-prefetch")
        if self.joins:
            self._next[nxt] = self._pool.submit(self.mlps[nxt - held.start].read_cold, True)
        else:
            self._next[nxt] = self._pool.submit(self.tier.read, nxt, start, self.plan.blocks)

    def take(self, layer: int):
        got = self._next.pop(layer, None)
        return None if got is None else got.result()

    def reset_counters(self) -> None:
        self.tier.fetched, self.tokens, self.hits, self.misses = 0, 0, 0, 0

    def stats(self) -> dict:
        seen = self.hits + self.misses
        return {"fetched_bytes_per_token": self.tier.fetched / max(self.tokens, 1),
                "hit_rate": self.hits / seen if seen else 1.0, "tokens_counted": self.tokens}

    def install(self, model, sparse_layers=None) -> None:
        """Put a ResidentMLP in each layer (in the backend's R.ResidentModule), over the empty ones the backend's
        load left; the hot blocks are read here, and the counters start after. sparse_layers: each layer's router
        and prior (sparse mode). A pipeline rank's: its own layers only (the others are stubs)."""
        for i, layer in enumerate(model.model.layers):
            if i not in self.plan.held:
                continue
            s = sparse_layers[i] if sparse_layers is not None else None
            mlp = ResidentMLP(self.R, self.tier, i, self.plan, self, s)
            self.mlps.append(mlp)
            layer.mlp = self.R.ResidentModule()
            layer.mlp.resident = mlp
        self.reset_counters()


# ---- building and opening --------------------------------------------------------------------------------

def _store_layer(stored: tensors.Shards, i: int) -> dict[str, np.ndarray]:
    """Layer i's stored MLP tensors as numpy (bf16 as uint16 bits), by suffix ('gate_proj.weight', ...)."""
    want = [f"{p}.{k}" for p in mlp_names(i) for k in ("weight", "scales", "biases")]
    return {n.split(".mlp.")[1]: (stored.read(n), stored[n].header[n]["dtype"]) for n in want if n in stored}


def _dense_float(arrays: dict | None, stored: tensors.Shards, spec: ModelSpec, proj: str) -> np.ndarray:
    """A stored projection as float32 numpy, through its format. arrays: the layer's stored tensors when the
    folder is quantized (_store_layer, already read: GGUF blocks where spec.gguf names a type; affine when its
    scales are stored, mlx-lm's rule, its group size from the stored shapes); None for a dense folder, whose
    floats are read here."""
    if arrays is None:
        return formats.get("dense").from_stored(stored, f"{proj}.weight").dequantize()
    key = proj.split(".mlp.")[1]
    w, dt = arrays[f"{key}.weight"]
    if spec.gguf and proj in spec.gguf:
        return gguf_blocks.decode(spec.gguf[proj], w)
    if f"{key}.scales" not in arrays:
        return tensors.to_float32(w, dt)
    s, b = (tensors.to_float32(*arrays[f"{key}.{k}"]) for k in ("scales", "biases"))
    bits = spec.quant["bits"]
    return formats.get("affine")(w, s, b, bits, w.shape[1] * 32 // bits // s.shape[1]).dequantize()


def block_slices(arrays: dict, b: int, block: int = BLOCK) -> dict:
    """Block b of a layer's stored tensors: rows of gate and up, columns of down (packed codes, scales and
    biases, or a GGUF's blocks, sliced at the same neuron range)."""
    n = arrays["gate_proj.weight"][0].shape[0]
    out = {}
    for name, (a, dt) in arrays.items():
        if name.startswith("down_proj"):
            width = a.shape[1] * block // n
            out[name] = (np.ascontiguousarray(a[:, b * width:(b + 1) * width]), dt)
        else:
            out[name] = (np.ascontiguousarray(a[b * block:(b + 1) * block]), dt)
    return out


def build(backend, model_dir: Path, spec: ModelSpec, dtype: str, calib_text: str | None = None,
          progress: bool = True) -> Path:
    """Write the cold tier for (model, backend layout, dtype) unless it exists for these weights; returns its
    folder. Hotness from calibration text when given (the model runs over it once), else from the weights. One
    process at a time writes it (pipeline ranks on one host): the others then find it written."""
    quantized = spec.quant is not None or bool(spec.gguf)
    kind, key = backend.resident.layout(spec, dtype) if quantized else ("dense", "dense")
    out = folder(model_dir, backend.NAME, key, dtype)
    with one_at_a_time(out):
        return _build(backend, model_dir, spec, dtype, calib_text, progress, out, kind)


def _build(backend, model_dir: Path, spec: ModelSpec, dtype: str, calib_text: str | None, progress: bool, out: Path,
           kind: str) -> Path:
    R, quantized = backend.resident, spec.quant is not None or bool(spec.gguf)
    fp = fingerprint(model_dir, spec)
    if (out / INDEX).is_file():
        try:
            idx = json.loads((out / INDEX).read_text())
            if idx.get("version") == VERSION and idx.get("fingerprint") == fp and \
                    idx.get("hotness") == ("calibration" if calib_text else "weights"):
                return out
        except ValueError:
            pass
    a, size = spec.architecture, block_size(spec)
    if a.intermediate_size % size:
        raise DnError(f"residency needs an MLP size that is a multiple of {size} (this model: {a.intermediate_size})")
    if spec.codec is not None:
        raise DnError("residency runs on dense and affine-quantized folders; this one is lossless-coded")
    inputs = calibrate.mlp_inputs(backend, model_dir, spec, calib_text) if calib_text else None
    layout = []

    def layers():
        for i in range(a.num_hidden_layers):
            arrays = _store_layer(stored, i) if quantized else None  # dense: the floats are enough
            g, u, d = (_dense_float(arrays, stored, spec, p) for p in mlp_names(i))
            hot = weight_hotness(g, u, d) if inputs is None else activation_hotness(inputs[i], g, u, d, a.mlp_act)
            order = block_order(hot, size)
            blocks = _blocks(R, arrays, None if quantized else (g, u, d), order, spec, dtype, size)
            del g, u, d
            own = _layout_of(blocks[0])
            if not layout:
                layout.extend(own)
            pieces = []
            for t, piece in enumerate(own):
                outer, inner = split(piece)
                pieces.append(np.stack([np.ascontiguousarray(bl[t][0]).view(np.uint8).reshape(outer, inner)
                                        for bl in blocks], axis=1))
            if progress:
                print(f"\rwriting the cold tier: layer {i + 1}/{a.num_hidden_layers}", end="", file=sys.stderr)
            yield order, pieces, own
        if progress:
            print(file=sys.stderr)

    info = part_info(spec, dtype, kind)
    with contextlib.ExitStack() as files:
        stored = tensors.Shards.open(files, weight_files(model_dir))
        write_cold(out, layers(), layout, {"fingerprint": fp, "backend": backend.NAME, "dtype": dtype,
                                           "blocks": a.intermediate_size // size, "block": size, "part": info,
                                           "hotness": "calibration" if calib_text else "weights"})
    return out


def _blocks(R, arrays: dict, dense: tuple | None, order: np.ndarray, spec: ModelSpec, dtype: str,
            size: int = BLOCK) -> list[list]:
    """A layer's blocks in order, each as the backend computes on it: [(tensor as numpy, the axis blocks join
    along)]. Dense: one bundle [BLOCK, 3, d] (gate rows, up rows, down columns) at dtype (bf16 as its bits), from
    the layer's float32 projections `dense`; affine or GGUF blocks: R's layout, per projection."""
    if dense is None:
        return [[t for p in ("gate_proj", "up_proj", "down_proj")
                 for t in R.block_arrays(block_slices(arrays, int(b), size), p, spec, dtype)] for b in order]
    g, u, d = dense
    out = []
    for b in order:
        r = slice(int(b) * BLOCK, (int(b) + 1) * BLOCK)
        bundle = np.stack([g[r], u[r], d[:, r].T], axis=1)
        out.append([(tensors.convert(bundle, "float32", dtype), 0)])
    return out


def _layout_of(blocks) -> list[dict]:
    return [{"shape": list(t.shape), "numpy": t.dtype.str, "itemsize": t.dtype.itemsize, "axis": axis}
            for t, axis in blocks]


def open_runtime(backend, model_dir: Path, spec: ModelSpec, dtype: str, budget: int, mode: str = "exact",
                 calib_text: str | None = None, prefetch: bool = False, stage=None) -> Runtime:
    """Build the cold tier if needed, plan the budget and open the tier; the backend's load then installs a
    ResidentMLP per layer (Runtime.mlps). stage: a pipeline rank, planned over its own layers and tensors."""
    path = build(backend, model_dir, spec, dtype, calib_text, progress=sys.stderr.isatty())  # a bar on a terminal only
    tier = ColdTier(path)
    if tier.block != block_size(spec):
        raise DnError(f"{path}: the cold tier's blocks are of {tier.block} neurons, this dn plans {block_size(spec)}; "
                      "delete the folder to rebuild it")
    plan = make_plan(spec, dtype, budget, mode, tier.block_bytes, buffers=2 if prefetch and mode == "exact" else 1,
                     buffer_block_bytes=tier.max_block_bytes, stage=stage)
    rank = f"-layers{plan.held.start}-{plan.held.stop}" if plan.span else ""
    (path / f"plan-{mode}-{budget}{rank}.json").write_text(json.dumps(plan.summary(), indent=1))
    return Runtime(tier, plan, backend.resident, prefetch)


# ---- the CLI -----------------------------------------------------------------------------------------

def add_args(parser) -> None:
    """--max-resident and its companions, on generate, eval, footprint and bench."""
    g = parser.add_argument_group("residency")
    g.add_argument("--max-resident", default=None, metavar="SIZE",
                   help="memory budget for the weights: 300MB, 1.5GiB, or 25%% of the model's dense bf16 weights; "
                        "the hottest MLP neurons stay resident, the rest are read from a cold file (default: off); "
                        "with --pipeline each rank's own (a %% of its share), or one per rank: 40MB,60MB")
    g.add_argument("--residency-mode", default="exact", choices=MODES,
                   help="exact: every neuron, cold ones read per token; sparse: a sparse model's router picks "
                        "neurons per token; per-sequence: the prompt picks each layer's set (default: exact)")
    g.add_argument("--calib-text", default=None, metavar="FILE",
                   help="rank neurons by activation on this text when the cold file is first written (default: "
                        "by weight norms)")
    g.add_argument("--prefetch", action="store_true",
                   help="exact mode: read the next layer's cold neurons in a thread (default: off)")


def load_args(args) -> dict:
    return {"max_resident": args.max_resident, "mode": args.residency_mode, "calib_text": args.calib_text,
            "prefetch": args.prefetch}


def fields(runtime: Runtime | None) -> dict:
    """The residency figures of a run (dn eval --json, dn bench), None without a budget."""
    if runtime is None:
        return dict.fromkeys(("max_resident_bytes", "fetched_bytes_per_token", "hit_rate", "residency_mode"))
    return {"max_resident_bytes": runtime.plan.budget, "residency_mode": runtime.plan.mode,
            "planned_resident_bytes": runtime.plan.resident, **runtime.stats()}
