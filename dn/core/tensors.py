"""Minimal safetensors reader/writer over numpy, bf16 kept as raw uint16 bits: the one tensor path.

The safetensors package's numpy API cannot hold bf16, and the codec needs the raw bits anyway, so dn reads the
header itself. Loaders read through File (each file opened once, plain reads, float dtypes converted here a chunk
of rows at a time); backends only place the arrays it hands them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from pathlib import Path

import numpy as np

from dn.core.errors import DnError
from dn.core.files import atomic_file
from dn.core.progress import progress

# safetensors dtype -> numpy dtype of the stored bits (BF16 stays uint16).
DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
NUMPY_TO_ST = {np.dtype(v): k for k, v in DTYPES.items() if k != "BF16"}
FLOATS = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}  # safetensors -> dn's names of the floats
NUMPY = {"float32": np.float32, "bfloat16": np.uint16, "float16": np.float16}  # dn float -> numpy (bf16: its bits)
CHUNK_BYTES = 2 << 20  # of stored rows converted at a time: all a loader holds beside the model while converting
BAR_AT_ONCE_BYTES = 200 << 20  # a load this large shows its bar at once; a smaller one only after BAR_DELAY_S
BAR_DELAY_S = 1.0
_bar = None  # the bar of the load under way (reading): every File read advances it by the bytes read


def _open(path: Path):
    """Every read of a safetensors file opens it here (tests/test_tensor_path.py counts them)."""
    return open(path, "rb")


def read_header(path: str | Path) -> tuple[dict, int]:
    """Return (header dict without __metadata__, data offset); DnError if malformed."""
    with File(path) as f:
        return f.header, f.offset


def _header(f, path: Path) -> tuple[dict, int]:
    try:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) != 8:
            raise DnError(f"{path}: not a safetensors file (truncated header)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 * 2**20):
            raise DnError(f"{path}: not a safetensors file (bad header length)")
        header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DnError(f"{path}: cannot read safetensors header ({e.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise DnError(f"{path}: not a safetensors file (header is not an object)")
    header.pop("__metadata__", None)
    end = 8 + n
    for name, info in header.items():
        try:
            start, stop = info["data_offsets"]
            ok = info["dtype"] in DTYPES and 0 <= start <= stop and end + stop <= size
            nbytes = int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(DTYPES[info["dtype"]]).itemsize
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok or nbytes != stop - start:
            raise DnError(f"{path}: corrupt safetensors entry for tensor {name!r}")
    return header, end


def check_folder(folder: str | Path) -> None:
    """Every safetensors file of a model folder (weights and dn's side files) has a sound header and all the
    bytes it declares, so a truncated or clobbered file is one clear line before any framework reads it."""
    for f in sorted(Path(folder).glob("*.safetensors")):
        read_header(f)


def load(path: str | Path, mmap: bool = True, names=None) -> dict[str, tuple[np.ndarray, str]]:
    """Map every tensor (or read each into fresh memory, mmap=False): name -> (array of stored bits,
    safetensors dtype string). names: only those (absent ones are left out). Reads, not a mapping, let a
    loader hold what it has not dropped yet only: mapped pages stay resident until the whole file is unmapped."""
    if not mmap:
        with File(path) as f:
            wanted = f.header if names is None else [n for n in names if n in f.header]
            return {name: (f.read(name), f.header[name]["dtype"]) for name in wanted}
    with File(path) as f:
        data = np.memmap(f._f, dtype=np.uint8, mode="r")  # the mapping outlives the file object
    out = {}
    for name in f.header if names is None else [n for n in names if n in f.header]:
        info = f.header[name]
        start, stop = info["data_offsets"]
        buf = data[f.offset + start: f.offset + stop]
        out[name] = (buf.view(DTYPES[info["dtype"]]).reshape(info["shape"]), info["dtype"])
    return out


@contextlib.contextmanager
def reading(folder: str | Path, desc: str = "loading"):
    """A bar on a terminal over the bytes read from the folder's safetensors files while inside (both backends'
    loaders read through File): a newcomer otherwise waits in front of a blank screen."""
    global _bar
    total = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
    delay = 0.0 if total >= BAR_AT_ONCE_BYTES else BAR_DELAY_S
    with progress(total, f"{desc} {Path(folder).name}", "B", delay, unit_scale=True, unit_divisor=1024) as bar:
        outer, _bar = _bar, bar
        try:
            yield bar
        finally:
            _bar = outer


class File:
    """One safetensors file, opened once: its header, and its tensors read by plain reads into fresh memory (not
    a mapping: mapped pages count as resident until the whole file is unmapped), whole or by rows, as stored or
    converted to another float dtype a chunk of rows at a time. The one path by which dn and both backends read
    stored tensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._f = _open(self.path)
        except OSError as e:
            raise DnError(f"{self.path}: cannot read safetensors header ({e.__class__.__name__})") from None
        try:
            self.header, self.offset = _header(self._f, self.path)
        except BaseException:
            self._f.close()
            raise

    def __enter__(self) -> File:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    def dtype(self, name: str) -> str:
        """The stored dtype: dn's name of a float ("float32", "bfloat16", "float16"), else safetensors' ("U32")."""
        st = self.header[name]["dtype"]
        return FLOATS.get(st, st)

    def shape(self, name: str) -> list[int]:
        return list(self.header[name]["shape"])

    def read(self, name: str, dtype: str | None = None, r0: int = 0, r1: int | None = None) -> np.ndarray:
        """Rows [r0, r1) of a tensor (all of it by default) as stored (bf16 as uint16 bits), or converted to the
        float dtype `dtype` a chunk of rows at a time into the array returned: no whole copy at the stored dtype
        exists beside it."""
        shape = self.shape(name)
        if dtype in (None, self.dtype(name)):
            return self._rows(name, r0, r1)
        if not shape:
            return convert(self._rows(name), self.dtype(name), dtype)
        r1 = shape[0] if r1 is None else min(r1, shape[0])
        out = np.empty([r1 - r0, *shape[1:]], NUMPY[dtype])
        for r, a in self.chunks(name, dtype, r0, r1):
            out[r - r0:r - r0 + len(a)] = a
        return out

    def mapped(self, name: str) -> np.ndarray:
        """A tensor as stored, mapped from the file instead of read: only the pages a caller touches become
        resident (an untied input embedding: a token reads one row). Copy-on-write, so a framework may wrap it."""
        info = self.header[name]
        a = np.memmap(self.path, dtype=np.dtype(DTYPES[info["dtype"]]), mode="c",
                      offset=self.offset + info["data_offsets"][0], shape=tuple(info["shape"]))
        if _bar is not None:  # in place at once: counted as loaded, so the loading bar ends full
            _bar.update(a.nbytes)
        return a

    def chunks(self, name: str, dtype: str | None = None, r0: int = 0, r1: int | None = None):
        """(first row, the rows from it) over rows [r0, r1), CHUNK_BYTES of stored rows at a time, as stored or
        converted to `dtype`: what a loader converting into memory of its own holds beside it."""
        shape, src = self.shape(name), self.dtype(name)
        rows = shape[0] if shape else 1
        r1 = rows if r1 is None else min(r1, rows)
        row = math.prod(shape[1:]) * np.dtype(DTYPES[self.header[name]["dtype"]]).itemsize
        step = max(1, CHUNK_BYTES // max(row, 1))
        for r in range(r0, r1, step):
            a = self._rows(name, r, min(r + step, r1))
            yield r, a if dtype is None else convert(a, src, dtype)

    def _rows(self, name: str, r0: int = 0, r1: int | None = None) -> np.ndarray:
        info = self.header[name]
        shape, dt = list(info["shape"]), np.dtype(DTYPES[info["dtype"]])
        rows, per = (shape[0], math.prod(shape[1:])) if shape else (1, 1)
        r1 = rows if r1 is None else min(r1, rows)
        self._f.seek(self.offset + info["data_offsets"][0] + r0 * per * dt.itemsize)
        a = np.fromfile(self._f, dtype=dt, count=(r1 - r0) * per)
        if _bar is not None:
            _bar.update(a.nbytes)
        return a.reshape([r1 - r0, *shape[1:]] if shape else [])


class Shards(dict):
    """Stored tensor name -> the File holding it, over a folder's weight files, each opened once (in `stack`) for
    a whole load or build; read by name like one File (a module's tensors may sit in two shards)."""

    @classmethod
    def open(cls, stack, paths) -> Shards:
        shards = cls()
        for path in paths:
            f = stack.enter_context(File(path))
            shards |= dict.fromkeys(f.header, f)
        return shards

    def read(self, name: str, dtype: str | None = None) -> np.ndarray:
        return self[name].read(name, dtype)

    def shape(self, name: str) -> list[int]:
        return self[name].shape(name)


def save(tensors: dict[str, tuple[np.ndarray, str] | np.ndarray], path: str | Path,
         metadata: dict[str, str] | None = None) -> None:
    """Write atomically (temporary file, then rename). Values: array or (bits, dtype string)."""
    path = Path(path)
    header, chunks, pos = {}, [], 0
    for name in sorted(tensors):
        value = tensors[name]
        arr, dt = value if isinstance(value, tuple) else (value, NUMPY_TO_ST[np.asarray(value).dtype])
        arr = np.ascontiguousarray(arr)
        header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [pos, pos + arr.nbytes]}
        chunks.append(arr)
        pos += arr.nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for arr in chunks:
            f.write(memoryview(arr).cast("B"))
        os.chmod(tmp, 0o644)


def convert(a: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Values from dtype src to the float dtype dst, dn's names (bfloat16 as uint16 bits): exact upcasts,
    downcasts rounded to nearest even, as Tensor.to and mx.astype convert."""
    if src == dst:
        return a
    if src == "bfloat16":
        a = bf16_to_f32(a)
    return f32_to_bf16(a) if dst == "bfloat16" else a.astype(NUMPY[dst])


def to_float32(a: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values of dtype (safetensors' name or dn's) as float32."""
    return convert(a, FLOATS.get(dtype, dtype), "float32")


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bf16 bits (uint16) -> float32, exact."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits, round to nearest even (NaN kept quiet)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    return np.where(nan, ((u >> 16) | 0x40).astype(np.uint16), rounded)
