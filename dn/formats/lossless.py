"""Lossless weight codec, format version 1: the numpy reference every backend decodes bit-exactly.

A 16-bit weight w splits into a coded SYMBOL byte and a RAW byte:
  bfloat16: symbol = exponent (w >> 7) & 0xFF,  raw = sign|mantissa ((w >> 8) & 0x80) | (w & 0x7F)
  float16:  symbol = high byte w >> 8,          raw = low byte w & 0xFF
Raw bytes are stored as they are. Symbols are coded with a per-tensor canonical Huffman code whose
lengths are capped at MAXLEN bits, so a decoder needs one LUT of 2**MAXLEN entries
(entry = symbol | length << 8, indexed by the next MAXLEN bits of the stream).

Tiling, so any tile decodes independently and decoders write coalesced: a tile is LANES streams of
STEPS symbols (T = LANES * STEPS elements). Lane l of tile t codes elements t*T + s*LANES + l for
s = 0..STEPS-1 (elements past n are not coded). Each lane's stream is MSB-first and starts at a
per-lane uint32 bit offset into one bitstream of uint32 words (stream bit 0 = MSB of word 0), padded
with two zero words so a 64-bit window can always be read. A crc32 over every stored buffer is checked
on load.
"""

from __future__ import annotations

import heapq
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dn.core import tensors
from dn.core.errors import DnError

VERSION = 1
LANES, STEPS, MAXLEN = 128, 512, 12
DTYPES = ("bfloat16", "float16")
INDEX_FILE, DATA_FILE = "dn_codec.json", "dn_codec.safetensors"
BUFFERS = ("lengths", "words", "offsets", "raw")


@dataclass
class EncodedTensor:
    dtype: str
    shape: tuple[int, ...]
    n: int
    lanes: int
    steps: int
    maxlen: int
    lengths: np.ndarray  # uint8 [256], 0 = symbol absent
    words: np.ndarray  # uint32 [n_words + 2]
    offsets: np.ndarray  # uint32 [n_tiles * lanes], bit offset of each lane stream
    raw: np.ndarray  # uint8 [n]
    crc32: int = 0
    version: int = VERSION

    @property
    def n_tiles(self) -> int:
        return -(-self.n // (self.lanes * self.steps))

    def nbytes(self) -> int:
        """Everything stored for this tensor, side tables included (the JSON header counted too)."""
        return sum(getattr(self, b).nbytes for b in BUFFERS) + len(json.dumps(self.header()))

    def bits_per_weight(self) -> float:
        return 8 * self.nbytes() / self.n

    def header(self) -> dict:
        return {"version": self.version, "dtype": self.dtype, "shape": list(self.shape), "n": self.n,
                "lanes": self.lanes, "steps": self.steps, "maxlen": self.maxlen, "crc32": self.crc32}


def split(bits: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """uint16 bits -> (symbol, raw) uint8 arrays."""
    b = bits.astype(np.uint16, copy=False)
    if dtype == "bfloat16":
        return ((b >> 7) & 0xFF).astype(np.uint8), (((b >> 8) & 0x80) | (b & 0x7F)).astype(np.uint8)
    return (b >> 8).astype(np.uint8), (b & 0xFF).astype(np.uint8)


def join(sym: np.ndarray, raw: np.ndarray, dtype: str) -> np.ndarray:
    s, r = sym.astype(np.uint16), raw.astype(np.uint16)
    if dtype == "bfloat16":
        return ((r & 0x80) << 8) | (s << 7) | (r & 0x7F)
    return (s << 8) | r


def huffman_lengths(counts: np.ndarray, maxlen: int) -> np.ndarray:
    """Code lengths (uint8 [256]) of a Huffman code over the nonzero counts, capped at maxlen by
    flattening the counts (rare symbols get longer, never invalid, codes)."""
    counts = counts.astype(np.int64)
    present = np.flatnonzero(counts)
    if len(present) == 1:
        out = np.zeros(256, np.uint8)
        out[present] = 1
        return out
    shift = 0
    while True:
        c = np.maximum(counts[present] >> shift, 1)
        lengths = _huffman(c)
        if lengths.max() <= maxlen:
            out = np.zeros(256, np.uint8)
            out[present] = lengths
            return out
        shift += 1


def _huffman(counts: np.ndarray) -> np.ndarray:
    heap = [(int(c), i, [i]) for i, c in enumerate(counts)]
    heapq.heapify(heap)
    lengths = np.zeros(len(counts), np.int64)
    tie = len(counts)
    while len(heap) > 1:
        c1, _, a = heapq.heappop(heap)
        c2, _, b = heapq.heappop(heap)
        lengths[a + b] += 1
        heapq.heappush(heap, (c1 + c2, tie, a + b))
        tie += 1
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """uint32 [256] code values; canonical order = sorted by (length, symbol)."""
    codes = np.zeros(256, np.uint32)
    code, prev = 0, 0
    for sym in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[sym]) - prev
        codes[sym], prev = code, int(lengths[sym])
        code += 1
    return codes


def build_lut(lengths: np.ndarray, maxlen: int) -> np.ndarray:
    """uint16 [2**maxlen]: entry = symbol | length << 8 for every maxlen-bit window starting with its code."""
    lut = np.zeros(1 << maxlen, np.uint16)
    codes = canonical_codes(lengths)
    for sym in np.flatnonzero(lengths):
        ln = int(lengths[sym])
        start = int(codes[sym]) << (maxlen - ln)
        lut[start:start + (1 << (maxlen - ln))] = sym | (ln << 8)
    return lut


def lane_order(n: int, lanes: int, steps: int) -> np.ndarray:
    """Element index of each (stream, step), [n_streams, steps]; -1 past n."""
    tile = lanes * steps
    n_tiles = -(-n // tile)
    t = np.arange(n_tiles)[:, None, None] * tile
    s = np.arange(steps)[None, None, :] * lanes
    l = np.arange(lanes)[None, :, None]  # noqa: E741
    idx = (t + s + l).reshape(n_tiles * lanes, steps)
    return np.where(idx < n, idx, -1)


def encode(bits: np.ndarray, dtype: str, lanes: int = LANES, steps: int = STEPS, maxlen: int = MAXLEN) -> EncodedTensor:
    if dtype not in DTYPES:
        raise DnError(f"codec: unsupported dtype {dtype!r} (codes {', '.join(DTYPES)})")
    flat = np.ascontiguousarray(bits).reshape(-1).view(np.uint16)
    sym, raw = split(flat, dtype)
    lengths = huffman_lengths(np.bincount(sym, minlength=256), maxlen)
    codes = canonical_codes(lengths)
    order = lane_order(flat.size, lanes, steps)  # [streams, steps]
    valid = order >= 0
    s = sym[np.where(valid, order, 0)]
    ln = np.where(valid, lengths[s], 0).astype(np.int64)
    stream_bits = ln.sum(1)
    offsets = np.concatenate([[0], np.cumsum(stream_bits)[:-1]])
    total = int(stream_bits.sum())
    if total >= 2**32:
        raise DnError("codec: tensor too large for 32-bit stream offsets")
    pos = (offsets[:, None] + np.cumsum(ln, 1) - ln)[valid]  # bit position of every coded symbol
    c, ln = codes[s[valid]].astype(np.uint64), ln[valid].astype(np.uint64)
    n_words = (total + 31) // 32 + 2
    word, o = pos >> 5, (pos & 31).astype(np.uint64)
    val = c << (np.uint64(64) - o - ln)  # code placed in the 64-bit window of words (word, word+1)
    hi = np.bincount(word, weights=(val >> np.uint64(32)).astype(np.float64), minlength=n_words)
    lo = np.bincount(word + 1, weights=(val & np.uint64(0xFFFFFFFF)).astype(np.float64), minlength=n_words + 1)
    words = (hi + lo[:n_words]).astype(np.uint64).astype(np.uint32)  # exact: codes never overlap
    enc = EncodedTensor(dtype, tuple(np.shape(bits)), flat.size, lanes, steps, maxlen, lengths, words,
                        offsets.astype(np.uint32), raw)
    enc.crc32 = checksum(enc)
    return enc


def decode(enc: EncodedTensor) -> np.ndarray:
    """The reference decoder -> uint16 [shape] (a pack of one tensor)."""
    return decode_pack(pack({"": enc})).reshape(enc.shape)


def checksum(enc: EncodedTensor) -> int:
    crc = zlib.crc32(json.dumps({k: v for k, v in enc.header().items() if k != "crc32"}).encode())
    for b in BUFFERS:
        crc = zlib.crc32(np.ascontiguousarray(getattr(enc, b)).view(np.uint8), crc)
    return crc


def verify(enc: EncodedTensor, name: str) -> None:
    if enc.version != VERSION:
        raise DnError(f"codec: tensor {name} has format version {enc.version}, this dn reads {VERSION}")
    if enc.dtype not in DTYPES:
        raise DnError(f"codec: tensor {name} has unsupported dtype {enc.dtype!r}")
    if checksum(enc) != enc.crc32:
        raise DnError(f"codec: checksum mismatch in tensor {name} (corrupt or truncated data)")


# ---- model folders -------------------------------------------------------------------------------

def codable(name: str, shape, dtype: str) -> bool:
    """Coded: 2-D projection weights inside decoder layers (embeddings stay dense, see docs/codec.md)."""
    return dtype in ("BF16", "F16") and len(shape) == 2 and ".layers." in name and name.endswith("proj.weight")


def to_tensors(name: str, enc: EncodedTensor) -> dict:
    return {f"{name}.{b}": getattr(enc, b) for b in BUFFERS}


def from_tensors(name: str, header: dict, tensors: dict) -> EncodedTensor:
    try:
        bufs = {b: np.asarray(tensors[f"{name}.{b}"]) for b in BUFFERS}
        enc = EncodedTensor(header["dtype"], tuple(header["shape"]), header["n"], header["lanes"],
                            header["steps"], header["maxlen"], crc32=header["crc32"],
                            version=header["version"], **bufs)
    except KeyError as e:
        raise DnError(f"codec: tensor {name} is missing {e}") from None
    verify(enc, name)
    return enc


def load_index(model_dir: Path) -> dict[str, dict]:
    """The coded tensors of a compressed folder, name -> header (dn_codec.json), format version checked."""
    try:
        index = json.loads((Path(model_dir) / INDEX_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DnError(f"{model_dir}: unreadable {INDEX_FILE} ({e.__class__.__name__})") from None
    if index.get("version") != VERSION:
        raise DnError(f"codec: format version {index.get('version')!r} is not supported (this dn reads {VERSION})")
    return index["tensors"]


# ---- stats ---------------------------------------------------------------------------------------

def stats(path: Path) -> dict:
    """Bits per weight of every 16-bit (or fp32, rounded to bf16 first) floating tensor of a
    safetensors file or model folder, all side tables counted."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise DnError(f"{path}: no safetensors file")
    out, total_w, total_b, converted = {}, 0, 0, False
    for f in files:
        for name, (bits, dt) in tensors.load(f).items():
            if dt not in ("BF16", "F16", "F32") or np.size(bits) < 2:
                continue
            if dt == "F32":
                bits, converted = tensors.f32_to_bf16(np.asarray(bits)), True
            enc = encode(np.asarray(bits), "float16" if dt == "F16" else "bfloat16")
            entropy = _entropy(split(np.asarray(bits).reshape(-1), enc.dtype)[0])
            out[name] = {"weights": enc.n, "bytes": enc.nbytes(), "bits_per_weight": enc.bits_per_weight(),
                         "symbol_entropy_bits": entropy, "dtype": enc.dtype}
            total_w, total_b = total_w + enc.n, total_b + enc.nbytes()
    if not total_w:
        raise DnError(f"{path}: no floating-point tensors to code")
    return {"total": {"weights": total_w, "bytes": total_b, "bits_per_weight": 8 * total_b / total_w},
            "source_fp32_rounded_to_bf16": converted, "format_version": VERSION,
            "lanes": LANES, "steps": STEPS, "maxlen": MAXLEN, "tensors": out}


def _entropy(sym: np.ndarray) -> float:
    p = np.bincount(sym, minlength=256) / sym.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


# ---- packs: several tensors decoded by one launch (one decoder layer) ---------------------------

@dataclass
class Pack:
    """The tensors of one decoder layer laid out for one decode launch; what a backend keeps resident.
    table[k] = (first stream, word base, output start, n) of tensor k; stream_meta() derives the rest."""
    lanes: int
    steps: int
    maxlen: int
    dtype: str
    words: np.ndarray  # uint32 [W], the tensors' bitstreams back to back
    offsets: np.ndarray  # uint32 [S], each stream's bit offset within its tensor's bitstream
    luts: np.ndarray  # uint16 [T * 2**maxlen]
    raw: np.ndarray  # uint8 [n]
    table: np.ndarray  # int64 [T, 4]
    slices: list  # (name, start, shape) of each tensor in the flat output

    @property
    def n(self) -> int:
        return self.raw.size

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.words, self.offsets, self.luts, self.raw, self.table))


def pack(encs: dict[str, EncodedTensor]) -> Pack:
    first = next(iter(encs.values()))
    key = (first.lanes, first.steps, first.maxlen, first.dtype)
    if any((e.lanes, e.steps, e.maxlen, e.dtype) != key for e in encs.values()):
        raise DnError("codec: tensors of one pack must share lanes, steps, maxlen and dtype")
    table, slices = [], []
    stream = word = out = 0
    for name, e in encs.items():
        table.append((stream, word, out, e.n))
        slices.append((name, out, e.shape))
        stream, word, out = stream + e.n_tiles * e.lanes, word + e.words.size, out + e.n
    cat = np.concatenate
    return Pack(*key, cat([e.words for e in encs.values()]), cat([e.offsets for e in encs.values()]),
                cat([build_lut(e.lengths, e.maxlen) for e in encs.values()]), cat([e.raw for e in encs.values()]),
                np.array(table, np.int64), slices)


def stream_meta(p: Pack) -> tuple[np.ndarray, ...]:
    """Per stream: (absolute bit position, LUT base, output base, symbol count)."""
    streams = np.diff(np.append(p.table[:, 0], p.offsets.size))
    tid = np.repeat(np.arange(len(p.table)), streams)
    local = np.arange(p.offsets.size) - p.table[tid, 0]
    lane, tile_start = local % p.lanes, local // p.lanes * p.lanes * p.steps
    bitpos = p.offsets.astype(np.int64) + 32 * p.table[tid, 1]
    count = np.clip(-(-(p.table[tid, 3] - tile_start - lane) // p.lanes), 0, p.steps)
    return bitpos, tid << p.maxlen, p.table[tid, 2] + tile_start + lane, count


def decode_pack(p: Pack) -> np.ndarray:
    """Reference decode of a pack -> uint16 [n] (tensors back to back)."""
    words = p.words.astype(np.uint64)
    pos, lut_base, out_base, count = stream_meta(p)
    sym = np.zeros(p.n, np.uint8)
    for s in range(p.steps):
        valid = s < count
        if not valid.any():
            break
        w = pos >> 5
        window = (words[w] << np.uint64(32)) | words[w + 1]
        idx = (window >> (np.uint64(64 - p.maxlen) - (pos & 31).astype(np.uint64))) & np.uint64((1 << p.maxlen) - 1)
        entry = p.luts[lut_base + idx.astype(np.int64)]
        sym[(out_base + s * p.lanes)[valid]] = (entry & 0xFF)[valid]
        pos = pos + np.where(valid, entry >> 8, 0)
    return join(sym, p.raw, p.dtype)
