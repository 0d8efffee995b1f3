"""Residency's cold file: every MLP block of a model, as the backend lays it out, in hotness order per layer, and its
index (offsets, a checksum per block, the layout). Written once per model, backend layout and dtype (temporary
names, then renamed); read with its checksums checked on every read."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import mmap
import os
import threading
from pathlib import Path

import numpy as np

from dn.core.errors import DnError
from dn.core.files import atomic_file
from dn.formats import native
from dn.model.spec import ModelSpec
from dn.runtime.residency.plan import BLOCK

VERSION = 2  # 2: a layer's tensor held [outer, blocks, inner]
FOLDER = "dn_residency"
INDEX, COLD = "index.json", "cold.bin"


def checksum(blocks: np.ndarray) -> np.ndarray:
    """Per block of a tensor's bytes laid out [outer, blocks, inner]: the sum of its words (the widest of 8, 4, 2
    or 1 bytes dividing inner), wrapping at 64 bits. Not cryptographic: it catches truncation, bit rot and a file
    changed underneath, at memory speed (dn/formats/csrc/checksum.c where built; this is its reference)."""
    lib = _sums()
    outer, n, inner = blocks.shape
    word = next(w for w in (8, 4, 2, 1) if inner % w == 0)
    aligned = blocks.ctypes.data % word == 0 and blocks.strides[0] % word == 0  # the kernel reads whole words
    if lib is not None and blocks.strides[1:] == (inner, 1) and n and aligned:
        out = np.empty(n, np.uint64)
        if lib.dn_block_sums(blocks.ctypes.data, outer, blocks.strides[0], n, inner, out.ctypes.data) == 0:
            return out
    word = next(w for w in (np.uint64, np.uint32, np.uint16, np.uint8) if inner % np.dtype(w).itemsize == 0)
    return blocks.view(word).sum(axis=(0, 2), dtype=np.uint64)


@functools.cache
def _sums():
    lib = native.library("checksum")
    if lib is not None:
        i64 = ctypes.c_int64
        lib.dn_block_sums.argtypes, lib.dn_block_sums.restype = [ctypes.c_void_p, i64, i64, i64, i64,
                                                                 ctypes.c_void_p], ctypes.c_int
    return lib


def folder(model_dir: Path, backend_name: str, layout_key: str, dtype: str) -> Path:
    return Path(model_dir) / FOLDER / f"{backend_name}-{layout_key}-{dtype}"


def fingerprint(model_dir: Path, spec: ModelSpec) -> str:
    """The stored MLP tensors the cold file was made from: names, shapes, dtypes, file sizes."""
    h = hashlib.sha256()
    for t in spec.tensors:
        if t.role == "mlp":
            h.update(f"{t.name}{t.shape}{t.dtype};".encode())
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size};".encode())
    return h.hexdigest()[:16]


_libc = None
with contextlib.suppress(OSError, AttributeError):  # mincore: POSIX; without it every read is checked
    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if os.uname().sysname == "Linux" else mmap.MADV_WILLNEED)


def split(t: dict) -> tuple[int, int]:
    """(outer, inner bytes) of one block's tensor around its join axis: the file holds a layer's tensor as
    [outer, blocks, inner], so any run of blocks is the joined tensor, as a view."""
    shape = t["shape"]
    return int(np.prod(shape[:t["axis"]])), int(np.prod(shape[t["axis"]:])) * t["itemsize"]


def write_cold(out: Path, layers, layout: list[dict], meta: dict) -> None:
    """Write the cold file and its index into out (temporary names, then renamed; nothing is left half-written:
    a full disk removes the temporaries and raises DnError). layers yields (order, tensors[, layer layout]):
    tensors[t] is tensor t of every block, uint8 [outer, blocks, inner] (see split), blocks in hotness order, so
    that the blocks of a run of positions, joined along their block axis, are a view of the file; a layer whose
    tensors are laid out otherwise than `layout` (a GGUF's down projection of another type) gives its own."""
    out.mkdir(parents=True, exist_ok=True)
    index = {"version": VERSION, "block": BLOCK, "layout": layout, **meta, "layers": []}
    try:  # the inner name is renamed first: the cold file, then the index that describes it
        with atomic_file(out / INDEX) as tmp_index, atomic_file(out / COLD) as tmp_cold:
            with open(tmp_cold, "wb") as f:
                for order, pieces, *own in layers:
                    entry = {"order": [int(b) for b in order], "offsets": [], "checksums": []}
                    if own and own[0] is not None and own[0] != layout:
                        entry["layout"] = own[0]
                    for p in pieces:  # [outer, blocks, inner]
                        entry["offsets"].append(f.tell())
                        entry["checksums"].append([str(int(c)) for c in checksum(p)])
                        f.write(p.tobytes())
                    index["layers"].append(entry)
                index["size"] = f.tell()
                f.flush()
                os.fsync(f.fileno())
            tmp_index.write_text(json.dumps(index))
    except OSError as e:
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
        self.layouts = [la.get("layout", self.layout) for la in self.index["layers"]]  # each layer's own, or the one
        for lay in [self.layout, *self.layouts]:
            for t in lay:
                t["outer"], t["inner"] = split(t)
        # one block as held: the mean over layers (a GGUF's down projections differ in type from layer to layer)
        sizes = [sum(t["outer"] * t["inner"] for t in lay) for lay in self.layouts] or [0]
        self.block_bytes, self.max_block_bytes = -(-sum(sizes) // len(sizes)), max(sizes)
        self.block = self.index.get("block", BLOCK)
        self.blocks = self.index["blocks"]
        self.sums = [[np.array([int(c) for c in cs], np.uint64) for cs in la["checksums"]]
                     for la in self.index["layers"]]
        self.fetched = 0          # bytes read since the last reset
        self._lock = threading.Lock()
        st = os.fstat(self.fd)
        self.identity = (st.st_size, st.st_mtime_ns, st.st_ino)
        self.checked = set()      # runs (layer, tensor, start, stop) whose checksums held since the file was opened
        self.base = np.frombuffer(self.map, np.uint8, 1).ctypes.data if self.map is not None else 0  # no export kept

    def order(self, layer: int) -> list[int]:
        return self.index["layers"][layer]["order"]

    def _view(self, layer: int, t: int) -> np.ndarray:
        spec = self.layouts[layer][t]
        off = self.index["layers"][layer]["offsets"][t]
        return np.frombuffer(self.map, np.uint8, spec["outer"] * self.blocks * spec["inner"], off).reshape(
            spec["outer"], self.blocks, spec["inner"])

    def _read(self, layer: int, t: int, start: int, stop: int, cached: bool = False) -> np.ndarray:
        """Tensor t of blocks [start, stop) -> uint8 [outer, stop - start, inner], a view of the mapping, checked.
        cached: its pages were all in the OS page cache before this read, so none came from the disk now: a run
        checked since the file was opened, in a file unchanged since (size, mtime, inode), is not summed again."""
        v = self._view(layer, t)[:, start:stop]
        key = (layer, t, start, stop)
        if not (cached and key in self.checked and self._unchanged()):
            bad = np.flatnonzero(checksum(v) != self.sums[layer][t][start:stop])
            if bad.size:
                raise DnError(f"cold tier file {self.dir / COLD}: block {start + int(bad[0])} of layer {layer} fails "
                              "its checksum (changed underneath?); delete the folder to rebuild it")
            self.checked.add(key)
        with self._lock:
            self.fetched += v.size
        return v

    def _unchanged(self) -> bool:
        """The file is the one opened (a writer in place changes its mtime): else every check starts again."""
        st = os.fstat(self.fd)
        if (st.st_size, st.st_mtime_ns, st.st_ino) == self.identity:
            return True
        self.checked.clear()
        return False

    def _span(self, layer: int, t: int, start: int, stop: int) -> tuple[int, int]:
        """Bytes of the file blocks [start, stop) of tensor t lie in: the run where its blocks are whole
        ([1, blocks, inner]), else the tensor's span (the run lies in every row)."""
        spec, off = self.layouts[layer][t], self.index["layers"][layer]["offsets"][t]
        if spec["outer"] == 1:
            return off + start * spec["inner"], off + stop * spec["inner"]
        return off, off + spec["outer"] * self.blocks * spec["inner"]

    def _in_page_cache(self, start: int, end: int) -> bool:
        """Whether every page of bytes [start, end) is in the OS page cache (mincore; False where unknown)."""
        start = start // mmap.PAGESIZE * mmap.PAGESIZE
        n = -(-(end - start) // mmap.PAGESIZE)
        if _libc is None or self.map is None or n <= 0:
            return False
        vec = (ctypes.c_ubyte * n)()
        if _libc.mincore(ctypes.c_void_p(self.base + start), ctypes.c_size_t(end - start), vec) != 0:
            return False
        return bool((np.frombuffer(vec, np.uint8) & 1).all())

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
        runs = [(int(r[0]), int(r[-1]) + 1) for r in np.split(pos, np.flatnonzero(np.diff(pos) != 1) + 1)]
        tensors = range(len(self.layouts[layer]))
        # a run checked before: does the page cache still hold it all (asked before it is mapped)?
        cached = {(t, r): (layer, t, *r) in self.checked and self._in_page_cache(*self._span(layer, t, *r))
                  for t in tensors for r in runs}
        for span in {self._span(layer, t, *r) for t in tensors for r in runs}:  # one call a span: faulting the
            self._madvise(_POPULATE_READ, *span)  # pages in one by one costs more
        out = []
        for t, spec in enumerate(self.layouts[layer]):
            raw = [self._read(layer, t, *r, cached[t, r]) for r in runs]
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

    def _madvise(self, advice: int, start: int, end: int) -> None:
        start = start // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start and hasattr(self.map, "madvise"):
            with contextlib.suppress(OSError):  # an older kernel without MADV_POPULATE_READ: pages fault in
                self.map.madvise(advice, start, end - start)

    def release(self, layer: int) -> None:
        """Unmap a layer's pages from the process (they stay in the OS page cache)."""
        end = self.index["layers"][layer + 1]["offsets"][0] if layer + 1 < len(self.index["layers"]) \
            else self.index["size"]
        self._madvise(mmap.MADV_DONTNEED, self.index["layers"][layer]["offsets"][0], end)

    def drop_cache(self) -> None:
        """Evict the file from the OS page cache, so the next reads come from the disk (flash on a Mac)."""
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
        os.close(self.fd)
