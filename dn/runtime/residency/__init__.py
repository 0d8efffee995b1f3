"""Residency: a memory budget the runtime keeps. The MLP neurons of each layer are cut into blocks of BLOCK
neurons ([gate rows | up rows | down columns], the layout of one block as the backend computes on it); the
hottest blocks stay resident, the rest live in a cold file read on demand. Everything else (embedding and
lm_head, attention, norms, a sparse model's routers and priors) stays resident in its stored format.

This module is the policy, the same on every backend: the budget, the planner, the cold file (written once
per model, backend layout and dtype; a checksum per block, checked on every read) and the resident MLP's
logic in its three modes. `dn_<backend>.resident` only lays a block out and computes on blocks.

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
import hashlib
import json
import mmap
import os
import re
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dn.core.errors import DnError
from dn.formats import sparse
from dn.model import store
from dn.model.spec import DTYPE_BYTES, ModelSpec

VERSION = 2  # 2: a layer's tensor held [outer, blocks, inner]
BLOCK = 64                      # neurons per block: a multiple of every affine group size and of torch's int4 rows
MODES = ("exact", "sparse", "per-sequence")
FOLDER = "dn_residency"
INDEX, COLD = "index.json", "cold.bin"
PROMPT_SHARE = 4    # per-sequence eval: the first ctx / PROMPT_SHARE tokens of a window are its prompt
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_budget(text: str, dense_bf16: int) -> int:
    """'300MB', '1.5GiB', '123456' (bytes) or '25%' (of the model's dense bf16 weights) -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%|[kKmMgG]i?[bB]|[bB])?\s*", str(text))
    if not m:
        raise DnError(f"--max-resident: expected a size like 300MB, 1.5GiB or 25%, got {text!r}")
    value, unit = float(m.group(1)), (m.group(2) or "b").lower()
    n = value / 100 * dense_bf16 if unit == "%" else value * _UNITS[unit]
    if n <= 0:
        raise DnError(f"--max-resident must be positive, got {text!r}")
    return int(n)


def mlp_names(i: int) -> tuple[str, str, str]:
    return tuple(f"model.layers.{i}.mlp.{p}_proj" for p in ("gate", "up", "down"))


# ---- the plan ---------------------------------------------------------------------------------------------

@dataclass
class Plan:
    mode: str
    budget: int                  # bytes the process may hold for weights (plus the stated margin)
    dense_bf16: int
    fixed: int                   # everything but the MLP neurons, as held
    side: int                    # sparse mode: routers, thresholds and priors
    block_bytes: int             # one block of BLOCK neurons as held
    blocks: int                  # per layer
    layers: int
    hot: list[int] = field(default_factory=list)   # resident blocks per layer
    buffer_blocks: int = 0       # blocks of read buffer (the largest cold run of a layer)

    @property
    def minimum(self) -> int:
        """No block resident: one layer's blocks read at a time."""
        return self.fixed + self.side + self.blocks * self.block_bytes

    @property
    def resident(self) -> int:
        return self.fixed + self.side + (sum(self.hot) + self.buffer_blocks) * self.block_bytes

    @property
    def hot_fraction(self) -> float:
        return sum(self.hot) / (self.blocks * self.layers)

    def summary(self) -> dict:
        return asdict(self) | {"minimum": self.minimum, "resident": self.resident,
                               "hot_fraction": self.hot_fraction}

    def lines(self) -> list[str]:
        mib = lambda n: f"{n / 2**20:.1f} MiB ({100 * n / self.dense_bf16:.1f}% of dense bf16)"
        return [f"residency plan ({self.mode}): budget {mib(self.budget)}",
                f"  resident, fixed (embedding/lm_head, attention, norms): {mib(self.fixed)}",
                *([f"  resident, sparse routers and priors: {mib(self.side)}"] if self.side else []),
                f"  resident MLP blocks: {sum(self.hot)} of {self.blocks * self.layers} "
                f"({100 * self.hot_fraction:.0f}%, {min(self.hot)}-{max(self.hot)} of {self.blocks} per layer, "
                f"{BLOCK} neurons each): {mib(sum(self.hot) * self.block_bytes)}",
                f"  read buffer: {self.buffer_blocks} blocks: {mib(self.buffer_blocks * self.block_bytes)}",
                f"  planned total: {mib(self.resident)}; minimum for this model: {mib(self.minimum)}",
                "  cold: the other MLP blocks, read from the cold file on demand (what the OS page cache keeps of "
                "it is not counted: it is not the process's memory)"]


def dense_bf16(spec: ModelSpec) -> int:
    """The model's weights as dense bf16: what budget percentages are of."""
    return sum(e.numel for e in store.entries(spec)) * 2


def fixed_bytes(spec: ModelSpec, dtype: str) -> int:
    """Bytes of everything but the MLP projections, as held at dtype (dn.model.store's accounting)."""
    b = DTYPE_BYTES[dtype]
    total = store.resident_bytes(spec, dtype)
    mlp = sum(store.entry_bytes(e, b) for e in store.entries(spec) if e.role == "mlp")
    return total["total"] - total["sparse"] - mlp


def block_bytes(spec: ModelSpec, dtype: str) -> int:
    """One block as accounted (dn.model.store), for a plan made without the cold file (dn footprint --no-measure)."""
    b = DTYPE_BYTES[dtype]
    layer = sum(store.entry_bytes(e, b) for e in store.entries(spec) if e.name.startswith("model.layers.0.mlp."))
    return layer * BLOCK // spec.architecture.intermediate_size


def make_plan(spec: ModelSpec, dtype: str, budget: int, mode: str, block_bytes: int) -> Plan:
    """Fill the budget with the hottest blocks, spread evenly over layers (files keep each layer's blocks in
    hotness order, so a layer's resident set is its first `hot` blocks). Raises DnError below the minimum."""
    if mode not in MODES:
        raise DnError(f"unknown residency mode {mode!r} (choose from {', '.join(MODES)})")
    if mode == "sparse" and spec.sparse is None:
        raise DnError("residency mode 'sparse' needs a sparse model (dn convert --sparsity S): this one has no router")
    a = spec.architecture
    n_layers, blocks = a.num_hidden_layers, a.intermediate_size // BLOCK
    side = spec.sparse["num_layers"] * store.sparse_side(spec.sparse, DTYPE_BYTES[dtype])["held"] \
        if mode == "sparse" else 0
    plan = Plan(mode, budget, dense_bf16(spec), fixed_bytes(spec, dtype), side, block_bytes, blocks, n_layers)
    if budget < plan.minimum:
        raise DnError(f"--max-resident {budget / 2**20:.1f} MiB is below this model's minimum of "
                      f"{plan.minimum / 2**20:.1f} MiB ({100 * plan.minimum / plan.dense_bf16:.1f}% of dense bf16: "
                      f"embedding/lm_head, attention, norms{', routers, priors' if side else ''} and one layer's "
                      f"MLP read at a time, {dtype})")
    # h resident blocks in each of L layers and a buffer of (blocks - h): fixed + side + (L h + blocks - h) B
    spare = (budget - plan.fixed - side) // block_bytes - blocks
    if spare >= (n_layers - 1) * blocks:
        plan.hot, plan.buffer_blocks = [blocks] * n_layers, 0
        return plan
    h, extra = divmod(spare, n_layers - 1) if n_layers > 1 else (blocks, 0)
    h = min(h, blocks - 1)
    extra = min(spare - h * (n_layers - 1), n_layers - 1)  # layers that hold one block more than the others
    plan.hot = [h + 1 if i < extra else h for i in range(n_layers)]
    plan.buffer_blocks = blocks - h
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
    a = sparse.act(act, g) * u
    return np.abs(a).mean(0) * np.linalg.norm(down, axis=0)


def block_order(hot: np.ndarray) -> np.ndarray:
    """Per-neuron hotness [n] -> block ids, hottest first."""
    return np.argsort(-hot.reshape(-1, BLOCK).sum(1), kind="stable")


# ---- the cold file ----------------------------------------------------------------------------------------

def checksum(blocks: np.ndarray) -> np.ndarray:
    """Per block of a tensor's bytes laid out [outer, blocks, inner]: the sum of its words (the widest of 8, 4, 2
    or 1 bytes dividing inner), wrapping at 64 bits. Not cryptographic: it catches truncation, bit rot and a file
    changed underneath, at memory speed."""
    inner = blocks.shape[2]
    word = next(w for w in (np.uint64, np.uint32, np.uint16, np.uint8) if inner % np.dtype(w).itemsize == 0)
    return blocks.view(word).sum(axis=(0, 2), dtype=np.uint64)


def folder(model_dir: Path, backend_name: str, layout_key: str, dtype: str) -> Path:
    return Path(model_dir) / FOLDER / f"{backend_name}-{layout_key}-{dtype}"


def _fingerprint(model_dir: Path, spec: ModelSpec) -> str:
    """The stored MLP tensors the cold file was made from: names, shapes, dtypes, file sizes."""
    h = hashlib.sha256()
    for t in spec.tensors:
        if t.role == "mlp":
            h.update(f"{t.name}{t.shape}{t.dtype};".encode())
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size};".encode())
    return h.hexdigest()[:16]


_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if os.uname().sysname == "Linux" else mmap.MADV_WILLNEED)


def _split(t: dict) -> tuple[int, int]:
    """(outer, inner bytes) of one block's tensor around its join axis: the file holds a layer's tensor as
    [outer, blocks, inner], so any run of blocks is the joined tensor, as a view."""
    shape = t["shape"]
    return int(np.prod(shape[:t["axis"]])), int(np.prod(shape[t["axis"]:])) * t["itemsize"]


def write_cold(out: Path, layers, layout: list[dict], meta: dict) -> None:
    """Write the cold file and its index into out (temporary names, then renamed; nothing is left half-written:
    a full disk removes the temporaries and raises DnError). layers yields (order, tensors): tensors[t] is tensor
    t of every block, uint8 [outer, blocks, inner] (see _split), blocks in hotness order, so that the blocks of a
    run of positions, joined along their block axis, are a view of the file."""
    out.mkdir(parents=True, exist_ok=True)
    tmp_cold, tmp_index = out / (COLD + ".tmp"), out / (INDEX + ".tmp")
    index = {"version": VERSION, "block": BLOCK, "layout": layout, **meta, "layers": []}
    try:
        with open(tmp_cold, "wb") as f:
            for order, pieces in layers:
                entry = {"order": [int(b) for b in order], "offsets": [], "checksums": []}
                for p in pieces:  # [outer, blocks, inner]
                    entry["offsets"].append(f.tell())
                    entry["checksums"].append([str(int(c)) for c in checksum(p)])
                    f.write(p.tobytes())
                index["layers"].append(entry)
            index["size"] = f.tell()
            f.flush()
            os.fsync(f.fileno())
        tmp_index.write_text(json.dumps(index))
        os.replace(tmp_cold, out / COLD)
        os.replace(tmp_index, out / INDEX)
    except OSError as e:
        for t in (tmp_cold, tmp_index):
            t.unlink(missing_ok=True)
        raise DnError(f"cannot write the cold tier in {out}: {e.strerror or e}") from None


class ColdTier:
    """The cold file, read with pread into fresh buffers; every piece's checksum is checked on read."""

    def __init__(self, path: Path):
        self.dir = Path(path)
        try:
            self.index = json.loads((self.dir / INDEX).read_text())
        except (OSError, ValueError) as e:
            raise DnError(f"cold tier index {self.dir / INDEX} is missing or unreadable ({e})") from None
        if self.index.get("version", 0) > VERSION:
            raise DnError(f"{self.dir}: cold tier version {self.index['version']} is newer than this dn reads "
                          f"({VERSION})")
        try:
            self.fd = os.open(self.dir / COLD, os.O_RDONLY)
        except OSError as e:
            raise DnError(f"cold tier file {self.dir / COLD} is missing ({e.strerror})") from None
        size = os.fstat(self.fd).st_size
        # private and copy-on-write: writable views for frameworks that want them; nothing is ever written
        self.map = mmap.mmap(self.fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE) if size else None
        if size != self.index["size"]:
            raise DnError(f"cold tier file {self.dir / COLD} is {size} bytes, its index says {self.index['size']}: "
                          "truncated or changed; delete the folder to rebuild it")
        self.layout = self.index["layout"]
        nb = self.index["blocks"]
        for t in self.layout:
            t["outer"], t["inner"] = _split(t)
        self.block_bytes = sum(t["outer"] * t["inner"] for t in self.layout)
        self.blocks = nb
        self.sums = [[np.array([int(c) for c in cs], np.uint64) for cs in la["checksums"]]
                     for la in self.index["layers"]]
        self.fetched = 0          # bytes read since the last reset
        self._lock = threading.Lock()

    def order(self, layer: int) -> list[int]:
        return self.index["layers"][layer]["order"]

    def _view(self, layer: int, t: int) -> np.ndarray:
        spec = self.layout[t]
        off = self.index["layers"][layer]["offsets"][t]
        return np.frombuffer(self.map, np.uint8, spec["outer"] * self.blocks * spec["inner"], off).reshape(
            spec["outer"], self.blocks, spec["inner"])

    def _read(self, layer: int, t: int, start: int, stop: int) -> np.ndarray:
        """Tensor t of blocks [start, stop) -> uint8 [outer, stop - start, inner], a view of the mapping, checked."""
        v = self._view(layer, t)[:, start:stop]
        bad = np.flatnonzero(checksum(v) != self.sums[layer][t][start:stop])
        if bad.size:
            raise DnError(f"cold tier file {self.dir / COLD}: block {start + int(bad[0])} of layer {layer} fails "
                          "its checksum (changed underneath?); delete the folder to rebuild it")
        with self._lock:
            self.fetched += v.size
        return v

    def read(self, layer: int, start: int, stop: int, copy: bool = False) -> list[np.ndarray] | None:
        """Blocks [start, stop) of a layer (file positions, hotness order) -> each tensor of those blocks joined
        along its block axis, as the backend lays it out."""
        return self.read_positions(layer, np.arange(start, stop), copy)

    def read_positions(self, layer: int, positions, copy: bool = False) -> list[np.ndarray] | None:
        """Blocks at sorted file positions -> joined tensors (None for no block). Without copy, a single run is
        views of the mapping: the caller drops them, then calls release(layer), so the pages leave the process
        (the page cache keeps them: not the process's memory); with copy, fresh memory (blocks kept resident)."""
        pos = np.asarray(positions, np.int64)
        if not pos.size:
            return None
        self._advise(layer, _POPULATE_READ)  # map the pages in one call: faulting them in one by one costs more
        runs = np.split(pos, np.flatnonzero(np.diff(pos) != 1) + 1)
        out = []
        for t, spec in enumerate(self.layout):
            raw = [self._read(layer, t, int(r[0]), int(r[-1]) + 1) for r in runs]
            raw = raw[0] if len(raw) == 1 else np.concatenate(raw, axis=1)
            if copy and len(runs) == 1:  # one run is a view of the file's pages; concatenate already copied
                raw = np.array(raw, order="C", copy=True)
            shape = spec["shape"]
            ax = spec["axis"]
            joined = [*shape[:ax], len(pos) * shape[ax], *shape[ax + 1:]]
            out.append(raw.view(spec["numpy"]).reshape(joined))
        if copy:
            self.release(layer)
        return out

    def _advise(self, layer: int, advice: int) -> None:
        la = self.index["layers"][layer]
        start = la["offsets"][0] // mmap.PAGESIZE * mmap.PAGESIZE
        end = self.index["layers"][layer + 1]["offsets"][0] if layer + 1 < len(self.index["layers"]) \
            else self.index["size"]
        if end > start and hasattr(self.map, "madvise"):
            with contextlib.suppress(OSError):  # an older kernel without MADV_POPULATE_READ: pages fault in
                self.map.madvise(advice, start, end - start)

    def release(self, layer: int) -> None:
        """Unmap a layer's pages from the process (they stay in the OS page cache)."""
        self._advise(layer, mmap.MADV_DONTNEED)

    def drop_cache(self) -> None:
        """Evict the file from the OS page cache, so the next reads come from the disk (flash on a Mac)."""
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
        os.close(self.fd)


# ---- the resident MLP, written once over a backend's `resident` module -----------------------------------

class ResidentMLP:
    """One layer's MLP under a plan. `R` is dn_<backend>.resident: make_part(arrays) -> part, acts(part, x)
    -> h [T, k], down(part, h) -> y [T, d], and the array helpers it lists."""

    def __init__(self, R, tier: ColdTier, layer: int, plan: Plan, runtime: Runtime, sparse=None):
        self.R, self.tier, self.layer, self.plan, self.rt = R, tier, layer, plan, runtime
        self.h, self.n_blocks = plan.hot[layer], plan.blocks
        self.order = np.asarray(tier.order(layer))
        self.hot = self._part(tier.read(layer, 0, self.h, copy=True)) if self.h else None
        self.y0 = None              # per-sequence: the answer for the neurons outside the selected set
        self.sparse = sparse        # sparse mode: the layer's router and prior (dn.runtime.sparse_mlp.SparseMLP)
        self._perm = self._c = None

    def _part(self, arrays):
        return None if arrays is None else self.R.make_part(arrays, self.tier.index["part"])

    # exact ----------------------------------------------------------------------------------------------
    def _cold(self):
        """This layer's cold blocks as one part: prefetched, or read now."""
        if self.h == self.n_blocks:
            return None
        recs = self.rt.take(self.layer)
        return self._part(recs if recs is not None else self.tier.read(self.layer, self.h, self.n_blocks))

    def __call__(self, x):
        R = self.R
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        self.rt.count(self.layer, x.shape[0])
        if self.plan.mode == "sparse":
            y = self._sparse(x)
        elif self.plan.mode == "per-sequence" and (x.shape[0] > 1 or self.y0 is None):
            y = self._select(x)
        elif self.plan.mode == "per-sequence":
            y = R.down(self.hot, R.acts(self.hot, x)) + self.y0
        else:
            cold = self._cold()
            self.rt.prefetch_next(self.layer)
            y = None
            for p in (self.hot, cold):
                if p is not None:
                    yp = R.down(p, R.acts(p, x))
                    y = yp if y is None else y + yp
            del cold
        y = R.settle(y)
        if self.h < self.n_blocks:
            self.tier.release(self.layer)  # the views of the cold blocks are gone with their part
        return y.reshape(shape)

    # per-sequence ---------------------------------------------------------------------------------------
    def _select(self, x):
        """A prompt: every block, as exact mode (the first `prompt` rows only, when set, are the prompt); then the
        layer keeps the blocks most active on the prompt, and the prompt's mean activation of the others."""
        R = self.R
        t = x.shape[0]
        p = t if not self.rt.prompt_tokens else min(t, self.rt.prompt_tokens)
        if self.h == self.n_blocks:
            self.y0 = 0
            return R.down(self.hot, R.acts(self.hot, x))
        every = self._part(self.tier.read(self.layer, 0, self.n_blocks))
        a = R.acts(every, x[:p])                                    # [p, n] in file order
        a_np = R.to_numpy(a)
        score = (a_np.astype(np.float32) ** 2).sum(0).reshape(self.n_blocks, BLOCK).sum(1)
        keep = np.sort(np.argsort(-score, kind="stable")[:self.h])  # file positions
        mean = a_np.mean(0)
        y_prompt = R.down(every, a)
        # y0 = D m - D[:, kept] m[kept]: the prompt's mean output less what the kept neurons add at their mean
        sel = np.zeros(self.n_blocks * BLOCK, bool)
        sel.reshape(self.n_blocks, BLOCK)[keep] = True
        rest = np.where(sel, 0, mean).astype(np.float32)[None]
        self.y0 = R.down(every, R.from_numpy(rest, a))
        del every
        self.hot = self._part(self.tier.read_positions(self.layer, keep, copy=True))
        if p == t:
            return y_prompt
        rest_y = R.down(self.hot, R.acts(self.hot, x[p:])) + self.y0
        return R.concat([y_prompt, rest_y])

    # sparse ---------------------------------------------------------------------------------------------
    def _sparse(self, x):
        """The router keeps neurons (original ids); the cold blocks holding kept neurons are read (whole
        blocks); kept neurons compute exactly, the sparse spec's prior answers for the rest."""
        R, s = self.R, self.sparse
        est = s.estimate(x)
        keep = s.route(x, est)
        if self._perm is None:   # file position -> neuron id, and the prior's constants in file order
            self._perm = (self.order[:, None] * BLOCK + np.arange(BLOCK)).reshape(-1)
            self._c = R.to_numpy(s.prior_c)[self._perm]
        m = R.to_numpy(keep)[:, self._perm] > 0                  # [T, n] in file order
        used = m.reshape(m.shape[0], self.n_blocks, BLOCK).any(axis=(0, 2))
        cold = np.flatnonzero(used[self.h:]) + self.h
        self.rt.hits += int(used[:self.h].sum())
        self.rt.misses += int(cold.size)
        y = s.prior_y0
        for part, pos in ((self.hot, np.arange(self.h)), (None, cold)):
            if not pos.size:
                continue
            part = part or self._part(self.tier.read_positions(self.layer, pos))
            cols = (pos[:, None] * BLOCK + np.arange(BLOCK)).reshape(-1)
            gate = R.from_numpy(np.where(m[:, cols], 1.0, 0.0).astype(np.float32), x)
            y = y + R.down(part, (R.acts(part, x) - R.from_numpy(self._c[cols], x)) * gate)
        if s.sketch:
            y = y + s.ops.cast(s.sketch_term(x, keep, est), y)
        return y


class Runtime:
    """The model-wide side of residency: the plan, the cold tier, counters and prefetch."""

    def __init__(self, tier: ColdTier, plan: Plan, prefetch: bool = False):
        self.tier, self.plan, self.prefetch = tier, plan, prefetch
        self.tokens, self.hits, self.misses = 0, 0, 0
        self.prompt_tokens = None          # per-sequence eval: a window's prompt length
        self._next = {}                    # layer -> the Future of its prefetch
        self._pool = None
        self.mlps = []

    def count(self, layer: int, tokens: int) -> None:
        if layer == 0:
            self.tokens += tokens
        if self.plan.mode == "exact":
            cold = self.plan.blocks - self.plan.hot[layer]
            self.hits += self.plan.hot[layer]
            self.misses += cold

    def prefetch_next(self, layer: int) -> None:
        """Exact mode: read (map and checksum) the next layer's cold blocks on a worker thread while this layer
        computes; the page faults and the checksum pass then overlap the compute (they release the GIL)."""
        if not self.prefetch:
            return
        nxt = (layer + 1) % self.plan.layers
        start = self.plan.hot[nxt]
        if start >= self.plan.blocks or nxt in self._next:
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="dn-prefetch")
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


def install(model, runtime: Runtime, R, module_cls, sparse_layers=None) -> None:
    """Put a ResidentMLP (bound to the backend's Module by module_cls) in each layer, over the placeholders the
    loader left; the hot blocks are read here, and the counters start after."""
    for i, layer in enumerate(model.model.layers):
        s = sparse_layers[i] if sparse_layers is not None else None
        mlp = ResidentMLP(R, runtime.tier, i, runtime.plan, runtime, s)
        runtime.mlps.append(mlp)
        layer.mlp = module_cls(mlp)
    runtime.reset_counters()


# ---- building and opening --------------------------------------------------------------------------------

def _store_layer(model_dir: Path, spec: ModelSpec, i: int) -> dict[str, np.ndarray]:
    """Layer i's stored MLP tensors as numpy (bf16 as uint16 bits), by suffix ('gate_proj.weight', ...)."""
    from dn.core import tensors as safetensors_io
    from dn.model.spec import weight_files

    want = {f"{p}.{k}" for p in mlp_names(i) for k in ("weight", "scales", "biases")}
    out = {}
    for f in weight_files(model_dir):
        for name, (a, dt) in safetensors_io.load(f, mmap=False, names=want).items():
            out[name.split(".mlp.")[1]] = (a, dt)
    return out


def _dense_float(arrays: dict, spec: ModelSpec, proj: str) -> np.ndarray:
    """A stored projection as float32 numpy (dequantized when affine)."""
    from dn.core import tensors as safetensors_io
    from dn.formats import quant

    w, dt = arrays[f"{proj}.weight"]
    if f"{proj}.scales" not in arrays:
        return safetensors_io.bf16_to_f32(w) if dt == "BF16" else w.astype(np.float32)
    s, b = (safetensors_io.bf16_to_f32(a) if d == "BF16" else a.astype(np.float32)
            for a, d in (arrays[f"{proj}.scales"], arrays[f"{proj}.biases"]))
    bits = spec.quant["bits"]
    return quant.dequantize(w, s, b, bits, w.shape[1] * 32 // bits // s.shape[1])


def block_slices(arrays: dict, b: int) -> dict:
    """Block b of a layer's stored tensors: rows of gate and up, columns of down (packed codes, scales and
    biases sliced at the same neuron range)."""
    n = arrays["gate_proj.weight"][0].shape[0]
    out = {}
    for name, (a, dt) in arrays.items():
        if name.startswith("down_proj"):
            width = a.shape[1] * BLOCK // n
            out[name] = (np.ascontiguousarray(a[:, b * width:(b + 1) * width]), dt)
        else:
            out[name] = (np.ascontiguousarray(a[b * BLOCK:(b + 1) * BLOCK]), dt)
    return out


def build(backend, model_dir: Path, spec: ModelSpec, dtype: str, calib_text: str | None = None,
          progress: bool = True) -> Path:
    """Write the cold tier for (model, backend layout, dtype) unless it exists for these weights; returns its
    folder. Hotness from calibration text when given (the model runs over it once), else from the weights."""
    import sys

    R = backend.resident_module()
    out = folder(model_dir, backend.NAME, R.layout_key(spec, dtype), dtype)
    fp = _fingerprint(model_dir, spec)
    if (out / INDEX).is_file():
        try:
            idx = json.loads((out / INDEX).read_text())
            if idx.get("version") == VERSION and idx.get("fingerprint") == fp and \
                    idx.get("hotness") == ("calibration" if calib_text else "weights"):
                return out
        except ValueError:
            pass
    a = spec.architecture
    if a.intermediate_size % BLOCK:
        raise DnError(f"residency needs an MLP size that is a multiple of {BLOCK} (this model: {a.intermediate_size})")
    if spec.codec is not None:
        raise DnError("residency runs on dense and affine-quantized folders; this one is lossless-coded")
    inputs = _calibration_inputs(backend, model_dir, spec, calib_text) if calib_text else None
    layout = []

    def layers():
        for i in range(a.num_hidden_layers):
            arrays = _store_layer(model_dir, spec, i)
            g, u, d = (_dense_float(arrays, spec, p) for p in ("gate_proj", "up_proj", "down_proj"))
            hot = weight_hotness(g, u, d) if inputs is None else activation_hotness(inputs[i], g, u, d, a.mlp_act)
            order = block_order(hot)
            blocks = [R.block_arrays(block_slices(arrays, int(b)), spec, dtype) for b in order]
            if not layout:
                layout.extend(_layout_of(blocks[0]))
            pieces = []
            for t, piece in enumerate(layout):
                outer, inner = _split(piece)
                pieces.append(np.stack([np.ascontiguousarray(bl[t][0]).view(np.uint8).reshape(outer, inner)
                                        for bl in blocks], axis=1))
            if progress:
                print(f"\rwriting the cold tier: layer {i + 1}/{a.num_hidden_layers}", end="", file=sys.stderr)
            yield order, pieces
        if progress:
            print(file=sys.stderr)

    info = R.part_info(spec, dtype)
    write_cold(out, layers(), layout, {"fingerprint": fp, "backend": backend.NAME, "dtype": dtype,
                                       "blocks": a.intermediate_size // BLOCK, "part": info,
                                       "hotness": "calibration" if calib_text else "weights"})
    return out


def _layout_of(tensors) -> list[dict]:
    return [{"shape": list(t.shape), "numpy": t.dtype.str, "itemsize": t.dtype.itemsize, "axis": axis}
            for t, axis in tensors]


def _calibration_inputs(backend, model_dir, spec, calib_text: str, tokens: int = 2048) -> list[np.ndarray]:
    """Each layer's MLP inputs over the first `tokens` tokens of the calibration text (the full model runs once)."""
    from dn.core import text
    from dn.model.tokenizer import Tokenizer

    ids = Tokenizer(model_dir, spec.architecture.eos_token_id).encode(text.read_text(Path(calib_text)))[:tokens]
    if len(ids) < 64:
        raise DnError(f"calibration text {calib_text} has {len(ids)} tokens; residency needs at least 64")
    model = backend.load(model_dir, spec, "float32")
    try:
        win = 512
        batches = [np.array([ids[i:i + win]]) for i in range(0, len(ids) - win + 1, win)] or [np.array([ids])]
        return backend.collect_mlp_inputs(model, batches)
    finally:
        del model
        backend.free(None)


def quantization_error(model_dir: Path, spec: ModelSpec, bits: int, group_size: int) -> float:
    """Relative RMS error of affine `bits`-bit groups of `group_size` on the first and last layer's linear
    weights (inf where the group size does not divide them)."""
    from dn.core import tensors as safetensors_io
    from dn.formats import quant
    from dn.model.spec import weight_files

    last = spec.architecture.num_hidden_layers - 1
    want = {t.name for t in spec.tensors if t.role in ("mlp", "attention") and len(t.shape) == 2
            and (".layers.0." in t.name or f".layers.{last}." in t.name)}
    err = ref = 0.0
    for f in weight_files(model_dir):
        for _, (a, dt) in safetensors_io.load(f, mmap=False, names=want).items():
            w = safetensors_io.bf16_to_f32(a) if dt == "BF16" else a.astype(np.float32)
            if w.shape[1] % group_size:
                return float("inf")
            err += float(np.sum((quant.dequantize(*quant.quantize(w, bits, group_size), bits, group_size) - w) ** 2))
            ref += float(np.sum(w ** 2))
    return (err / ref) ** 0.5 if ref else float("inf")


def store_for(model_dir: Path, spec: ModelSpec, dtype: str, budget: int, mode: str) -> tuple[Path, ModelSpec]:
    """The planner's choice of format for a dense folder whose budget its own format cannot meet: the cheapest
    that holds quality. 4-bit groups of 32 with an 8-bit embedding when that loses no more than 8-bit groups of 64
    would (the weights already lie on its grid: the default model, dequantized from Q4_1, 0.14% against 0.48%),
    else 8-bit groups of 64 (+0.1% on the default model, docs/formats.md). Converted once into the dn cache;
    other folders are used as they are."""
    import sys

    from dn.model.spec import load_spec

    if spec.quant is not None or spec.codec is not None or spec.sparse is not None:
        return model_dir, spec
    try:
        make_plan(spec, dtype, budget, mode, block_bytes(spec, dtype))
        return model_dir, spec
    except DnError:
        pass
    from dn.convert import convert, quantization
    from dn.model.sources import cache_dir

    four = quantization_error(model_dir, spec, 4, 32) <= quantization_error(model_dir, spec, 8, 64)
    fmt, q = ("q4g32e8", quantization(4, 32, 8, 32)) if four else ("q8g64", quantization(8, 64))
    key = hashlib.sha256(f"{Path(model_dir).resolve()}:{_fingerprint(model_dir, spec)}:".encode() + b"".join(
        str(f.stat().st_mtime_ns).encode() for f in sorted(Path(model_dir).glob("*.safetensors")))).hexdigest()[:16]
    out = cache_dir() / "residency-stores" / f"{key}-{fmt}"
    if not (out / "config.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"dn: the budget needs a smaller format than {model_dir.name}'s: storing it as {fmt} in {out}",
              file=sys.stderr)
        convert(model_dir, out, None, None, quant=q)
    return out, load_spec(out)


def open_runtime(backend, model_dir: Path, spec: ModelSpec, dtype: str, budget: int, mode: str = "exact",
                 calib_text: str | None = None, prefetch: bool = False) -> Runtime:
    """Build the cold tier if needed, plan the budget and open the tier; the backend's load then installs a
    ResidentMLP per layer (Runtime.mlps)."""
    path = build(backend, model_dir, spec, dtype, calib_text)
    tier = ColdTier(path)
    plan = make_plan(spec, dtype, budget, mode, tier.block_bytes)
    (path / f"plan-{mode}-{budget}.json").write_text(json.dumps(plan.summary(), indent=1))
    return Runtime(tier, plan, prefetch)


# ---- the CLI and dn bench -----------------------------------------------------------------------------

def add_args(parser) -> None:
    """--max-resident and its companions, on generate, eval, footprint and bench."""
    g = parser.add_argument_group("residency")
    g.add_argument("--max-resident", default=None, metavar="SIZE",
                   help="memory budget for the weights: 300MB, 1.5GiB, or 25%% of the model's dense bf16 weights; "
                        "the hottest MLP neurons stay resident, the rest are read from a cold file (default: off)")
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


def bench_options(budget: str, model_dir: Path, backend: str, dtype: str) -> dict:
    """dn bench's hook: `25%` (exact mode) or `25%:per-sequence`, over the record's folder."""
    from dn.runtime import loader

    size, _, mode = budget.partition(":")
    held = {}

    def load():
        held["run"] = loader.load(str(model_dir), backend, dtype, max_resident=size, mode=mode or "exact",
                                  calib_text=os.environ.get("DN_CALIB_TEXT"))
        return held["run"]

    return {"load": load, "fields": lambda: fields(held["run"].residency)}
