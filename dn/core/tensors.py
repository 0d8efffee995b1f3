"""Minimal safetensors reader/writer over numpy, bf16 kept as raw uint16 bits.

The safetensors package's numpy API cannot hold bf16, and the codec needs the raw bits
anyway, so dn reads the header itself and memory-maps the data.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

from dn.core.errors import DnError

# safetensors dtype -> numpy dtype of the stored bits (BF16 stays uint16).
DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
NUMPY_TO_ST = {np.dtype(v): k for k, v in DTYPES.items() if k != "BF16"}


def read_header(path: str | Path) -> tuple[dict, int]:
    """Return (header dict without __metadata__, data offset); DnError if malformed."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
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
    header, offset = read_header(path)
    if names is not None:
        header = {n: header[n] for n in names if n in header}
    out = {}
    if mmap:
        data = np.memmap(path, dtype=np.uint8, mode="r")
        for name, info in header.items():
            start, stop = info["data_offsets"]
            buf = data[offset + start: offset + stop]
            out[name] = (buf.view(DTYPES[info["dtype"]]).reshape(info["shape"]), info["dtype"])
        return out
    return {name: (read_rows(path, info, offset), info["dtype"]) for name, info in header.items()}


def read_rows(path: str | Path, info: dict, offset: int, r0: int = 0, r1: int | None = None) -> np.ndarray:
    """Rows [r0, r1) of one tensor (its header entry; offset: the file's data offset from read_header) as stored
    bits, read into fresh memory: a plain read, not a mapping, so only what a loader still holds is resident."""
    shape, dt = list(info["shape"]), np.dtype(DTYPES[info["dtype"]])
    rows, per = (shape[0], math.prod(shape[1:])) if shape else (1, 1)
    r1 = rows if r1 is None else min(r1, rows)
    with open(path, "rb") as f:
        f.seek(offset + info["data_offsets"][0] + r0 * per * dt.itemsize)
        a = np.fromfile(f, dtype=dt, count=(r1 - r0) * per)
    return a.reshape([r1 - r0, *shape[1:]] if shape else [])


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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for arr in chunks:
                f.write(memoryview(arr).cast("B"))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bf16 bits (uint16) -> float32, exact."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits, round to nearest even (NaN kept quiet)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    return np.where(nan, ((u >> 16) | 0x40).astype(np.uint16), rounded)
