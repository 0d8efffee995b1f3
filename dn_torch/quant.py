"""Affine group-wise quantized weights (mlx-lm's format, dn/formats/quant.py) on torch: W = scales * q + biases per
group of `group_size` inputs, the codes q packed `bits` at a time into little-endian uint32 words.

A quantized matrix [m, k] lives in one of three layouts, always in the same three buffers:
- mlx (as stored): weight uint32 [m, k*bits/32], scales and biases [m, k/gs]. Any device, bits, group size.
- int4 (CPU, 16-bit compute, 4 bits, m % 16 == 0): torch's tinygemm pack for `_weight_int4pack_mm_for_cpu`,
  weight uint8 [m, k/2]; scales [k/gs, m, 2] holds (scale, zero) with W = (q - 8) * scale + zero, so
  zero = bias + 8 * scale; biases is None.
- int8 (CPU, 16-bit compute, 8 bits): weight int8 [k/gs, m, gs] = q - 128, one per-channel
  `_weight_int8pack_mm` per group; scales [k/gs, m]; biases [k/gs, m] = zero = bias + 128 * scale.
- q8_0 (an embedding, or the tied head, of 8 bits in groups of 32, where dn's C kernels are built and every scale
  is a float16 exactly): weight GGUF Q8_0 blocks (float16 scale, q - 128), held as int16 words [m, k/32*17] so
  the layout names itself; scales None (in the blocks); biases the int8 layout's zeros. One C kernel call over
  the blocks (a bfloat16 x through its 8-bit copy, as native GGUF folders run; float32 x as it is) where int8
  takes one call per group.
The 16-bit zeros round bias + scale * 2^(bits-1), about the group's midpoint: small next to a step.
Both kernel layouts hold exactly the bytes of the mlx layout with 16-bit scales; `fill` converts once, at load.
affine_matmul runs the kernel for few tokens, else the plain path: dequantize at most _BLOCK elements of rows
at a time and matmul them, so no float copy of a whole matrix ever exists.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from dn.core.errors import DnError
from dn.formats import gguf_blocks as gb
from dn.formats import quant as ref
from dn_torch import kernels

_BLOCK = 1 << 20  # elements of dense rows the plain path holds at once
_REPACK = 1 << 18  # codes converted at once at load (small scratch, so the heap it leaves behind is too)
# Above these token counts the kernels (time linear in tokens) lose to the plain path (benchmarks/bench_quant.py,
# "crossover": 4096x14336 on one core, int4 ~1.3 ms a token vs ~90 ms plain, int8 ~3.5 ms vs ~80 ms).
_KERNEL_TOKENS = {"int4": 64, "int8": 16, "q8_0": 16}
_INT4_GROUPS = (32, 64, 128, 256)
_HALF = (torch.bfloat16, torch.float16)


def _kind(packed: torch.Tensor) -> str:
    return {torch.uint8: "int4", torch.int8: "int8", torch.int16: "q8_0"}.get(packed.dtype, "mlx")


def _shape(packed: torch.Tensor, bits: int) -> tuple[int, int]:
    """The dense [m, k] a packed weight in any layout stands for."""
    kind = _kind(packed)
    if kind == "int4":
        return packed.shape[0], 2 * packed.shape[1]
    if kind == "int8":
        return packed.shape[1], packed.shape[0] * packed.shape[2]
    if kind == "q8_0":
        return packed.shape[0], packed.shape[1] // 17 * 32
    return packed.shape[0], packed.shape[1] * 32 // bits


# ---- the plain path: codes of some rows -> dense rows -------------------------------------------------

def _unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """mlx-packed rows [R, k*bits/32] -> codes uint8 [R, k] (dn.formats.quant.unpack)."""
    r = packed.shape[0]
    n, nbytes = ref._chunk(bits)  # codes per run of whole bytes: 3- and 6-bit codes straddle bytes
    raw = packed.contiguous().view(torch.uint8).view(r, -1, nbytes)
    if nbytes == 1:  # 2, 4, 8 bits: each byte holds whole codes (8 bits: the bytes are the codes)
        raw, mask = raw[..., 0], (1 << bits) - 1
        return torch.stack([raw >> (i * bits) & mask for i in range(n)], -1).view(r, k) if n > 1 else raw
    word = raw[..., 0].int() | raw[..., 1].int() << 8 | raw[..., 2].int() << 16
    shifts = torch.arange(0, n * bits, bits, dtype=word.dtype, device=word.device)
    return ((word[..., None] >> shifts) & ((1 << bits) - 1)).to(torch.uint8).view(r, k)


def _parts(packed, scales, biases, bits: int, idx):
    """Rows idx (a slice or an index tensor) as (integer codes [R, k], scale [R, k/gs], offset [R, k/gs]),
    W = codes * scale + offset."""
    kind = _kind(packed)
    if kind == "mlx":
        return _unpack(packed[idx], bits, _shape(packed, bits)[1]), scales[idx], biases[idx]
    if kind == "int8":
        q = packed[:, idx]
        return q.transpose(0, 1).reshape(q.shape[1], -1), scales[:, idx].T, biases[:, idx].T
    if kind == "q8_0":
        b = packed[idx].view(torch.uint8)
        b = b.view(b.shape[0], -1, 34)
        return b[..., 2:].reshape(b.shape[0], -1).view(torch.int8), b[..., :2].view(torch.float16)[..., 0], \
            biases[:, idx].T
    sz = scales[:, idx].float()
    return _int4_codes(packed, idx), sz[..., 0].T, sz[..., 1].T - 8 * sz[..., 0].T  # (q - 8) s + z


def _dense(packed, scales, biases, bits: int, group_size: int, idx, dtype: torch.dtype) -> torch.Tensor:
    """Rows idx of W at dtype, dequantized in float32 in place: fewer passes than a 16-bit addcmul, and the
    values a dense float32 copy rounded to dtype would hold."""
    codes, scale, offset = _parts(packed, scales, biases, bits, idx)
    r, k = codes.shape
    w = codes.view(r, -1, group_size).float()
    w.mul_(scale.float()[..., None]).add_(offset.float()[..., None])
    return w.view(r, k).to(dtype)


def _rows_per_block(packed: torch.Tensor, k: int) -> int:
    """Rows of W the plain path dequantizes at once: _BLOCK elements, whole packed blocks for int4 (so at
    least one block: B * k elements)."""
    step = max(1, _BLOCK // k)
    if _kind(packed) == "int4":
        big = _int4_block_rows()
        step = max(big, step // big * big)
    return step


def _plain(x: torch.Tensor, packed, scales, biases, bits: int, group_size: int) -> torch.Tensor:
    """x [T, k] @ W.T, dequantizing a block of at most _BLOCK elements of W at a time."""
    m, k = _shape(packed, bits)
    step = _rows_per_block(packed, k)
    out = x.new_empty(x.shape[0], m)
    for r0 in range(0, m, step):
        w = _dense(packed, scales, biases, bits, group_size, slice(r0, r0 + step), x.dtype)
        out[:, r0:r0 + w.shape[0]] = x @ w.T
    return out


# ---- the kernels ------------------------------------------------------------------------------------

def _int4_kernel(x, packed, scales, biases, group_size, out=None):
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales)


def _int8_kernel(x, packed, scales, biases, group_size, out=None):
    """Per group g: x_g @ (scale_g * (q_g - 128)).T, plus the zeros times each group's input sum; float32 sum
    over groups, so the 16-bit partial products do not round once more per group."""
    xg = x.view(x.shape[0], -1, group_size)
    acc = (xg.sum(-1) @ biases).float()
    for g in range(packed.shape[0]):
        acc += torch.ops.aten._weight_int8pack_mm(xg[:, g].contiguous(), packed[g], scales[g])
    return acc.to(out or x.dtype)


def _q8_0_kernel(x, packed, scales, biases, group_size, out=None):
    """The blocks through dn's C kernel, then the zeros times each group's input sum, as the int8 kernel adds
    them. A bfloat16 x takes the integer path (x's 8-bit copy and VNNI dots: llama.cpp's route, and what native
    GGUF folders run; faster than the float path on the default model's head); float32
    x the float path (x as it is)."""
    raw, lib = packed.view(torch.uint8), gb.native()
    n, m, k = x.shape[0], raw.shape[0], x.shape[1]
    y, t = torch.empty(n, m), gb.TYPES["Q8_0"][0]
    if x.dtype == torch.bfloat16 and "Q8_0" in lib.q8:
        gb.check(lib.dn_gguf_matmul_q8(t, raw.data_ptr(), m, k, x.data_ptr(), n, y.data_ptr(), None, gb.BF16_X,
                                       kernels.threads(m * k)))
    else:
        xf = x.float().contiguous()
        gb.check(lib.dn_gguf_matmul(t, raw.data_ptr(), m, k, xf.data_ptr(), n, y.data_ptr(), kernels.threads(m * k)))
    y += (x.view(n, -1, group_size).sum(-1) @ biases).float()
    return y.to(out or x.dtype)


_KERNELS = {"int4": _int4_kernel, "int8": _int8_kernel, "q8_0": _q8_0_kernel}


def affine_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor | None,
                  bits: int, group_size: int, mode: str = ref.MODE, out: torch.dtype | None = None) -> torch.Tensor:
    """x [..., k] @ W.T for W [m, k] held quantized, in the mlx layout (packed uint32 [m, k*bits/32],
    scales/biases [m, k/gs]) or a kernel layout QuantizedLinear.prepare made of it -> [..., m], x's dtype or
    `out` (a head's float32 logits: the int8 kernel's float32 sums kept, the plain path run in float32)."""
    x2 = x.reshape(-1, x.shape[-1])
    kind = _kind(packed)
    held = scales if scales is not None else biases  # q8_0: the scales are in the blocks
    if (kind != "mlx" and x2.device.type == "cpu" and x2.dtype == held.dtype
            and x2.shape[0] <= _KERNEL_TOKENS[kind]):
        y = _KERNELS[kind](x2.contiguous(), packed, scales, biases, group_size, out)
    else:
        y = _plain(x2 if out is None else x2.to(out), packed, scales, biases, bits, group_size)
    return y.view(*x.shape[:-1], y.shape[-1]).to(out or y.dtype)


# ---- torch's CPU int4 layout ------------------------------------------------------------------------

def _int4_pack(codes: torch.Tensor) -> torch.Tensor:
    """int32 codes [n, k] in [0, 16) -> torch's CPU tinygemm layout, uint8 [n, k/2]."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)


def _int4_probe(n: int, k: int) -> torch.Tensor:
    """Where the pack puts each code of an [n, k] matrix: 2 * byte + nibble, int64 [n, k]. The order inside a
    block of rows depends on the CPU's vector width, so it is measured: pack index digits, 4 bits at a time."""
    src = torch.arange(n * k)
    at = torch.zeros_like(src)
    for d in range(0, max(n * k - 1, 1).bit_length(), 4):
        p = _int4_pack(((src >> d) & 15).view(n, k).int()).view(-1)
        at |= torch.stack([p & 15, p >> 4], -1).view(-1).long() << d
    where = torch.empty_like(src)
    where[at] = src
    return where.view(n, k)


@functools.cache
def _int4_block(nb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pos, nib) [nb] of one packed block of nb rows: code (r, c) is nibble nib[r] of byte c * nb/2 + pos[r]."""
    at = _int4_probe(nb, 2)
    return at[:, 0] >> 1, at[:, 0] & 1


@functools.cache
def _int4_block_rows() -> int:
    """Rows per packed block (64 on AVX-512, 32 on AVX2): twice the byte stride of row 0's codes."""
    at = _int4_probe(256, 2)
    return int(at[0, 1] - at[0, 0])


@functools.cache
def _int4_understood() -> bool:
    """Whether _int4_codes reads this torch's CPU pack back, for every size of the last block (checked once:
    the kernel layout is used only then)."""
    big = _int4_block_rows()
    gen = torch.Generator().manual_seed(0)
    for m in range(big + 16, 2 * big + 16, 16):
        codes = torch.randint(0, 16, (m, 64), generator=gen, dtype=torch.int32)
        packed = _int4_pack(codes)
        if not all(torch.equal(_int4_codes(packed, idx).int(), codes) for idx in (slice(0, m), torch.arange(m))):
            return False
    return True


def _int4_codes(packed: torch.Tensor, idx) -> torch.Tensor:
    """Codes uint8 [R, k] of rows idx of an int4-packed [m, k/2]: blocks of B rows, each k-major (the last
    block may be shorter). A slice starting on a block decodes whole blocks; other rows are gathered."""
    if isinstance(idx, slice) and (idx.start or 0) % _int4_block_rows() == 0:
        return _int4_slice(packed, idx.start or 0, idx.stop)  # the plain path's blocks
    m, k = _shape(packed, 4)
    big = _int4_block_rows()
    r = idx.cpu()
    tail = m - m % big
    within = r % big
    nb = torch.where(r >= tail, m - tail, big)
    pos, nib = (t[within] for t in _int4_block(big))
    if m > tail:
        last = r >= tail
        tpos, tnib = _int4_block(m - tail)
        pos[last], nib[last] = tpos[within[last]], tnib[within[last]]
    addr = ((r - within) * (k // 2) + pos)[:, None] + torch.arange(k) * (nb // 2)[:, None]
    byte = packed.view(-1)[addr.to(packed.device)]
    return (byte >> (4 * nib[:, None]).to(torch.uint8).to(packed.device)) & 15


@functools.cache
def _int4_rows_of(nb: int) -> list:
    """Per nibble (low, high): the rows of a packed block of nb rows whose codes that nibble of bytes 0, 1, ...
    of a k-slab holds; a slice where evenly spaced (torch's layouts: a strided copy, not a gather)."""
    pos, nib = _int4_block(nb)
    out = []
    for h in (0, 1):
        rows = torch.empty(nb // 2, dtype=torch.long)
        rows[pos[nib == h]] = torch.arange(nb)[nib == h]
        step = int(rows[1] - rows[0]) if nb > 2 else 1
        even = step > 0 and torch.equal(rows, rows[0] + step * torch.arange(nb // 2))
        out.append(slice(int(rows[0]), int(rows[-1]) + 1, step) if even else rows)
    return out


def _int4_slice(packed: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Codes of rows [r0, r1), r0 on a block boundary: each block's k-slabs of low and high nibbles, written
    transposed into the block's rows."""
    m, k = _shape(packed, 4)
    big = _int4_block_rows()
    r1, tail = min(r1, m), m - m % big
    out = []
    for a, b in ((r0, min(r1, tail)), (max(r0, tail), r1)):
        if a < b:
            nb = big if a < tail else m - tail
            raw = packed.view(-1)[a * k // 2:b * k // 2].view(-1, k, nb // 2)
            codes = raw.new_empty(raw.shape[0], nb, k)
            for nibble, rows in zip((raw & 15, raw >> 4), _int4_rows_of(nb)):
                codes[:, rows] = nibble.transpose(1, 2)
            out.append(codes.view(-1, k))
    return torch.cat(out) if len(out) > 1 else out[0]


def _to_int4(read, m: int, k: int, scales, biases, dtype):
    """Stored rows (read(r0, r1) -> uint32, mlx layout), 4 bits -> the int4 kernel layout, packed a chunk of
    whole blocks of rows at a time (a chunk packs as the same rows of the whole matrix)."""
    big = _int4_block_rows()
    step = max(1, _REPACK // (k * big)) * big
    out = torch.empty(m, k // 2, dtype=torch.uint8, device=scales.device)
    for r0 in range(0, m, step):
        out[r0:r0 + step] = _int4_pack(_unpack(read(r0, r0 + step), 4, k).int())
    sz = scales.new_empty(scales.shape[1], m, 2, dtype=dtype)
    sz[..., 0] = scales.T
    _zeros(sz[..., 1], sz[..., 0], biases, 8)
    return out, sz, None


def _to_int8(read, m: int, k: int, scales, biases, dtype):
    """Stored rows, 8 bits -> the int8 kernel layout: codes - 128 (the top bit flipped), grouped; a chunk of
    rows at a time."""
    groups = scales.shape[1]
    q = torch.empty(groups, m, k // groups, dtype=torch.int8, device=scales.device)
    step = max(1, _REPACK // k)
    for r0 in range(0, m, step):
        rows = read(r0, r0 + step).view(torch.uint8).view(-1, groups, k // groups)
        q[:, r0:r0 + rows.shape[0]].view(torch.uint8).copy_(rows.transpose(0, 1))
    q.view(torch.uint8).bitwise_xor_(0x80)
    s = scales.T.to(dtype).contiguous()
    return q, s, _zeros(torch.empty_like(s), s, biases, 128)


def _to_q8_0(read, m: int, k: int, scales, biases, dtype):
    """Stored rows, 8 bits in groups of 32 -> GGUF Q8_0 blocks (a chunk of rows at a time) and the int8 layout's
    zeros; None where a scale at dtype is not a float16 exactly (the int8 layout then)."""
    s = scales.T.to(dtype).contiguous()
    d = s.to(torch.float16)
    if not torch.equal(d.to(dtype), s):
        return None
    blocks = torch.empty(m, k // 32, 34, dtype=torch.uint8, device=scales.device)
    blocks[..., :2] = d.T.contiguous().view(torch.uint8).view(m, -1, 2)
    step = max(1, _REPACK // k)
    for r0 in range(0, m, step):
        rows = read(r0, r0 + step).view(torch.uint8).view(-1, k // 32, 32)
        blocks[r0:r0 + rows.shape[0], :, 2:] = rows.bitwise_xor(0x80)
    return blocks.view(m, -1).view(torch.int16), None, _zeros(torch.empty_like(s), s, biases, 128)


def _zeros(out, s, biases, half):
    """out = biases.T + half * s, written in place: no float32 copies of the group parameters (each one
    a heap block the loader would leave behind). With 16-bit stored biases at the compute dtype, rounded once."""
    out.copy_(biases.T)
    return out.add_(s, alpha=half)


def _kernel_layout(m: int, bits: int, group_size: int, dtype, device) -> str | None:
    if device.type != "cpu" or dtype not in _HALF:
        return None
    if bits == 8:
        return "int8"
    if bits == 4 and group_size in _INT4_GROUPS and m % 16 == 0 and _int4_understood():
        return "int4"
    return None


# ---- modules ----------------------------------------------------------------------------------------

class _Quantized(nn.Module):
    """The three buffers of one quantized [rows, cols] matrix, named as stored; filled by the loader."""

    BLOCKS = False  # 8 bits in groups of 32 held as Q8_0 blocks (an embedding: its rows and its tied head)

    def __init__(self, rows: int, cols: int, bits: int, group_size: int, dtype: torch.dtype):
        super().__init__()
        ref.check(bits, group_size)
        self.bits, self.group_size, self.compute_dtype = bits, group_size, dtype
        self.out = None  # the output dtype, when not x's (a head's float32 logits)
        meta = torch.device("meta")
        self.register_buffer("weight", torch.empty(rows, cols * bits // 32, dtype=torch.uint32, device=meta))
        self.register_buffer("scales", torch.empty(rows, cols // group_size, device=meta))
        self.register_buffer("biases", torch.empty(rows, cols // group_size, device=meta))

    def fill(self, read, dtype: torch.dtype) -> None:
        """Take the packed weight from where it is stored, read(r0, r1) -> rows [r0, r1) (uint32, mlx layout),
        into the layout it computes in at dtype: a kernel's where one runs here, converted a chunk of rows at
        a time, so no second copy of the matrix exists. Scales and biases must be in place."""
        self.compute_dtype = dtype
        m, k = self.scales.shape[0], self.scales.shape[1] * self.group_size
        kind = _kernel_layout(m, self.bits, self.group_size, dtype, self.scales.device)
        blocks = None
        if kind == "int8" and self.group_size == 32 and self.BLOCKS and gb.native() is not None:
            blocks = _to_q8_0(read, m, k, self.scales, self.biases, dtype)
        if blocks is not None:
            self.weight, self.scales, self.biases = blocks
        elif kind is None:
            self.weight = read(0, m)
        else:
            convert = _to_int4 if kind == "int4" else _to_int8
            self.weight, self.scales, self.biases = convert(read, m, k, self.scales, self.biases, dtype)

    def prepare(self, dtype: torch.dtype) -> None:
        """fill from the weight held in the mlx layout (modules built in memory; the loader fills from files)."""
        w = self.weight
        if _kind(w) == "mlx":
            self.fill(lambda r0, r1: w[r0:r1], dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return affine_matmul(x, self.weight, self.scales, self.biases, self.bits, self.group_size, out=self.out)

    def rows(self, idx) -> torch.Tensor:
        return rows(self, idx)


class QuantizedLinear(_Quantized):
    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int,
                 dtype: torch.dtype = torch.float32):
        super().__init__(out_features, in_features, bits, group_size, dtype)
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.empty(out_features, device="meta") if bias else None)

    def fill(self, read, dtype: torch.dtype) -> None:
        super().fill(read, dtype)
        if self.bias is not None:
            self.bias = self.bias.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)
        return y if self.bias is None else y + self.bias


class QuantizedEmbedding(_Quantized):
    BLOCKS = True
    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int,
                 dtype: torch.dtype = torch.float32):
        super().__init__(num_embeddings, embedding_dim, bits, group_size, dtype)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows(ids.reshape(-1)).view(*ids.shape, self.embedding_dim)

    def as_linear(self, x: torch.Tensor, out: torch.dtype | None = None) -> torch.Tensor:
        return affine_matmul(x, self.weight, self.scales, self.biases, self.bits, self.group_size, out=out or self.out)


class TiedHead(nn.Module):
    """A tied lm_head over a quantized embedding (this module's, or dn_torch.gguf's blocks). The embedding is held
    outside the module tree (it belongs to model.model), so it is neither listed twice nor replaced when
    transformers re-ties weights."""

    def __init__(self, embedding: nn.Module):
        super().__init__()
        self._tied = (embedding,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 logits, as on MLX: a bf16 logit near 25 moves in steps of 0.125 (ties)
        return self._tied[0].as_linear(x, torch.float32)


def _params(quantization: dict, path: str, cols: int) -> dict | None:
    """mlx-lm's rule: the module's own entry (parameters, or False: stays dense), else the global bits and
    group size when the group size divides its input size."""
    q = quantization.get(path, True)
    if q is True:
        q = quantization if cols % quantization["group_size"] == 0 else None
    if not q:
        return None
    if q.get("mode", ref.MODE) != ref.MODE:
        raise DnError(f"unsupported quantization mode {q['mode']!r} for {path} (dn runs {ref.MODE!r})")
    if cols % q["group_size"]:
        raise DnError(f"{path}: input size {cols} is not a multiple of its group size {q['group_size']}")
    return {"bits": q["bits"], "group_size": q["group_size"]}


def _quantized(module: nn.Module, q: dict) -> _Quantized:
    dtype = module.weight.dtype
    if isinstance(module, nn.Embedding):
        return QuantizedEmbedding(module.num_embeddings, module.embedding_dim, dtype=dtype, **q)
    return QuantizedLinear(module.in_features, module.out_features, module.bias is not None, dtype=dtype, **q)


def quantize_model(model: nn.Module, quantization: dict) -> nn.Module:
    """Swap the Linear and Embedding modules of a model skeleton for quantized ones, in place, by mlx-lm's rule
    (see _params). Their buffers are left on the meta device for the loader to fill with the stored tensors.
    A tied lm_head becomes a TiedHead over the quantized embedding, as mlx-lm's `as_linear`."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    head = model.get_output_embeddings()
    for path, module in list(model.named_modules()):
        if type(module) not in (nn.Linear, nn.Embedding) or (tied and module is head):
            continue
        q = _params(quantization, path, module.weight.shape[1])
        if q is not None:
            model.set_submodule(path, _quantized(module, q))
    embed = model.get_input_embeddings()
    if tied and isinstance(embed, QuantizedEmbedding):
        model.set_output_embeddings(TiedHead(embed))
    elif isinstance(model.get_output_embeddings(), QuantizedLinear):
        model.get_output_embeddings().out = torch.float32  # float32 logits, as TiedHead
    return model


def rows(module: nn.Module, idx) -> torch.Tensor:
    """Dense rows W[idx] of a (quantized) Linear or Embedding at its compute dtype, dequantizing only them."""
    w = module.weight
    idx = torch.as_tensor(idx, device=w.device)
    if not isinstance(module, _Quantized):
        return w[idx]
    return _dense(w, module.scales, module.biases, module.bits, module.group_size, idx, module.compute_dtype)
