"""Triton kernels for the lossless codec (CUDA/ROCm; CPU through TRITON_INTERPRET=1 in tests): the stored
Huffman format (below) and the runtime layout fixed4 (decode and fused decode+GEMV; the section "fixed4" further
down, tests/test_triton_fixed4.py).

Huffman: one program decodes one tile: LANES lanes, each walking its own MSB-first stream with a 64-bit bit
buffer in registers (one 32-bit refill every ~12 symbols, so the scattered stream reads stay rare).
Codes are canonical, so a code's length is the number of lengths L whose first code, left-justified
to MAXLEN bits, is <= the MAXLEN-bit window; its rank in (length, symbol) order is then
(window >> (MAXLEN - length)) + delta[length]. That needs three tiny tables per tensor (<= 1.3 KiB,
L1-resident) instead of gathers into the 2**MAXLEN LUT.
"""

import torch
import triton
import triton.language as tl

from dn_torch._codec_tables import tables as _tables
from dn_torch.ops import DTYPES


@triton.jit
def _start(words, pos, live):
    """Bit buffer of each lane at bit `pos`: (buf uint64 left-aligned, valid bits, next word index)."""
    w = pos >> 5
    hi = tl.load(words + w, mask=live, other=0).to(tl.uint32, bitcast=True).to(tl.uint64)
    lo = tl.load(words + w + 1, mask=live, other=0).to(tl.uint32, bitcast=True).to(tl.uint64)
    sh = (pos & 31).to(tl.int32)
    buf = ((hi << 32) | lo) << sh.to(tl.uint64)
    return buf, 64 - sh, w + 2


@triton.jit
def _next(words, buf, nbits, nw, live, ljs, delta, syms, MAXLEN: tl.constexpr):
    """One symbol per lane; the buffer keeps >= 33 valid bits after each refill."""
    win = (buf >> (64 - MAXLEN)).to(tl.int32)
    ln = tl.zeros_like(win)
    for L in tl.static_range(1, MAXLEN + 1):
        ln += (win >= tl.load(ljs + L)).to(tl.int32)
    rank = (win >> (MAXLEN - ln)) + tl.load(delta + ln)
    sym = tl.load(syms + rank, mask=live, other=0)
    buf = buf << ln.to(tl.uint64)
    nbits = nbits - ln
    need = live & (nbits <= 32)
    fresh = tl.load(words + nw, mask=need, other=0).to(tl.uint32, bitcast=True).to(tl.uint64)
    sh = tl.where(need, 32 - nbits, 0).to(tl.uint64)
    buf = tl.where(need, buf | (fresh << sh), buf)
    nbits = tl.where(need, nbits + 32, nbits)
    nw = tl.where(need, nw + 1, nw)
    return sym, buf, nbits, nw


@triton.jit
def _join32(sym, raw, BF16: tl.constexpr):
    """Symbol + raw byte (int32) -> the 16 bits in an int32."""
    if BF16:
        return ((raw & 0x80) << 8) | (sym << 7) | (raw & 0x7F)
    return (sym << 8) | raw


@triton.jit
def _join(sym, raw, BF16: tl.constexpr):
    """Symbol + raw byte -> int16 bits (truncated like a C cast)."""
    return _join32(sym, raw, BF16).to(tl.int16)


@triton.jit
def _decode_kernel(words, raw, out, pos_ptr, lut_base_ptr, out_base_ptr, count_ptr, ljs, delta, syms,
                   LANES: tl.constexpr, STEPS: tl.constexpr, MAXLEN: tl.constexpr, BF16: tl.constexpr):
    pid = tl.program_id(0)
    stream = pid.to(tl.int64) * LANES + tl.arange(0, LANES)
    k = (tl.load(lut_base_ptr + pid.to(tl.int64) * LANES) >> MAXLEN).to(tl.int32)  # a tile is one tensor
    count = tl.load(count_ptr + stream).to(tl.int32)
    o = tl.load(out_base_ptr + stream)
    buf, nbits, nw = _start(words, tl.load(pos_ptr + stream), count > 0)
    for s in range(0, STEPS):  # lanes past their count (last tile only) are masked
        live = s < count
        sym, buf, nbits, nw = _next(words, buf, nbits, nw, live, ljs + k * 32, delta + k * 32, syms + k * 256,
                                    MAXLEN)
        at = o + s * LANES  # the lanes of a step write LANES consecutive outputs
        r = tl.load(raw + at, mask=live, other=0).to(tl.int32)
        tl.store(out + at, _join(sym, r, BF16), mask=live)


@triton.jit
def _matvec_kernel(words, raw, x, y, pos_ptr, lut_base_ptr, count_ptr, ljs, delta, syms, N, B, IN, OUT, stride_x,
                   LANES: tl.constexpr, STEPS: tl.constexpr, MAXLEN: tl.constexpr, BF16: tl.constexpr,
                   BP: tl.constexpr):
    """y[b, r] += sum_c x[b, c] W[r, c] over this tile's elements. IN % LANES == 0, so each step's lanes
    lie in one row; one atomic add per (row segment, batch row)."""
    pid = tl.program_id(0)
    lanes = tl.arange(0, LANES)
    stream = pid.to(tl.int64) * LANES + lanes
    k = (tl.load(lut_base_ptr + pid.to(tl.int64) * LANES) >> MAXLEN).to(tl.int32)
    count = tl.load(count_ptr + stream).to(tl.int32)
    buf, nbits, nw = _start(words, tl.load(pos_ptr + stream), count > 0)
    e0 = pid.to(tl.int64) * (LANES * STEPS)
    n_steps = tl.minimum((N - e0 + LANES - 1) // LANES, STEPS).to(tl.int32)
    row, col = e0 // IN, e0 % IN
    b = tl.arange(0, BP)
    bm = b < B
    s = 0
    while s < n_steps:
        seg = tl.minimum((IN - col) // LANES, n_steps - s).to(tl.int32)
        acc = tl.zeros([BP, LANES], tl.float32)
        j = 0
        while j < seg:  # a while loop: the interpreter cannot range() over a tensor
            live = (s + j) < count
            sym, buf, nbits, nw = _next(words, buf, nbits, nw, live, ljs + k * 32, delta + k * 32,
                                        syms + k * 256, MAXLEN)
            r = tl.load(raw + e0 + (s + j) * LANES + lanes, mask=live, other=0).to(tl.int32)
            bits = _join(sym, r, BF16)
            if BF16:
                w = bits.to(tl.bfloat16, bitcast=True).to(tl.float32)
            else:
                w = bits.to(tl.float16, bitcast=True).to(tl.float32)
            w = tl.where(live, w, 0.0)
            xv = tl.load(x + b[:, None] * stride_x + col + j * LANES + lanes[None, :],
                         mask=bm[:, None] & live[None, :], other=0.0).to(tl.float32)
            acc += xv * w[None, :]
            j += 1
        tl.atomic_add(y + b * OUT + row, tl.sum(acc, 1), mask=bm)
        s += seg
        row += 1
        col = col * 0


def decode(words, luts, raw, pos, lut_base, out_base, count, out, lanes, steps, maxlen, bf16) -> None:
    """Decode every stream of a pack into out (int16 [n]); arguments as dn_torch.codec.PackedLayer."""
    if pos.numel() == 0:
        return
    ljs, delta, syms = _tables(luts, maxlen)
    grid = (pos.numel() // lanes,)
    _decode_kernel[grid](words, raw, out, pos, lut_base, out_base, count, ljs, delta, syms,
                         LANES=lanes, STEPS=steps, MAXLEN=maxlen, BF16=bf16, num_warps=max(1, lanes // 32))


def _meta(p):
    """p.stream_meta(), kept on the layer per device: it syncs the device, so not once per call, but it
    holds 32 bytes per lane stream (0.5 bits/weight), so only matvec and the benchmark keep it."""
    cached = getattr(p, "_dn_meta", None)
    if cached is None or cached[0] != p.words.device:
        cached = (p.words.device, p.stream_meta())
        p._dn_meta = cached
    return cached[1]


def matvec(p, x: torch.Tensor, shape) -> torch.Tensor:
    """y = x @ W.T for a one-tensor PackedLayer W [out, in] and x [B, in], B <= 16, without
    materialising W. Sums in float32 in another order than cuBLAS: close, not bit-identical."""
    n_out, n_in = shape
    if x.dim() != 2 or x.shape[1] != n_in or x.shape[0] > 16 or n_in % p.lanes:
        w = torch.empty(p.n, dtype=torch.int16, device=x.device)
        p.decode(w)
        w = w.view(torch.bfloat16 if p.dtype == "bfloat16" else torch.float16).view(shape)
        return x @ w.to(x.dtype).T
    pos, lut_base, _, count = _meta(p)
    ljs, delta, syms = _tables(p.luts, p.maxlen)
    xc = x.contiguous()
    y = torch.zeros(x.shape[0], n_out, dtype=torch.float32, device=x.device)
    bp = max(1, triton.next_power_of_2(x.shape[0]))
    _matvec_kernel[(pos.numel() // p.lanes,)](
        p.words, p.raw, xc, y, pos, lut_base, count, ljs, delta, syms, p.n, x.shape[0], n_in, n_out, xc.stride(0),
        LANES=p.lanes, STEPS=p.steps, MAXLEN=p.maxlen, BF16=p.dtype == "bfloat16", BP=bp,
        num_warps=max(1, p.lanes // 32))
    return y.to(x.dtype)


# ---- fixed4: the runtime layout of dn/formats/fixed4.py ------------------------------------------------------
# Every weight decodes on its own: rank = its nibble, symbol = table[rank] (rank 15: an escape, fixed by a
# second pass), bits = join(symbol, raw byte). Where the element count is even (every real projection), a
# program reads nibble bytes and raw bytes as uint16 pairs, contiguous, so the loads can vectorise: element 2j is
# the low nibble of byte j and the low byte of raw pair j.

ESCAPE = tl.constexpr(15)  # dn.formats.fixed4.ESCAPE; kernels read only constexpr globals


@triton.jit
def _f4_bits(rank, raw, table, BF16: tl.constexpr):
    """rank, raw (int32) -> the weight's 16 bits in the low half of an int32 (escapes: table[15], i.e. 0)."""
    return _join32(tl.load(table + rank).to(tl.int32), raw, BF16)


@triton.jit
def _f4_float(bits, BF16: tl.constexpr):
    """16 bits (int32) -> float32 value."""
    if BF16:
        return (bits << 16).to(tl.float32, bitcast=True)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _f4_weight(rank, raw, table, BF16: tl.constexpr):
    """The main pass's weight: escapes count as 0 (their corrections are added separately)."""
    return tl.where(rank == ESCAPE, 0.0, _f4_float(_f4_bits(rank, raw, table, BF16), BF16))


@triton.jit
def _f4_decode_kernel(table, nib, raw, raw16, out, out32, N, BF16: tl.constexpr, PAIRED: tl.constexpr,
                      F32: tl.constexpr, BLOCK: tl.constexpr):
    """F32: out holds float32 values (the exact upcast); else int16 bits."""
    pid = tl.program_id(0).to(tl.int64)
    if PAIRED:  # N even: BLOCK pairs, from contiguous nibble bytes and raw uint16 pairs
        j = pid * BLOCK + tl.arange(0, BLOCK)
        m = j < N // 2
        byte = tl.load(nib + j, mask=m, other=0).to(tl.int32)
        r2 = tl.load(raw16 + j, mask=m, other=0).to(tl.int32)
        lo = _f4_bits(byte & 15, r2 & 0xFF, table, BF16)
        hi = _f4_bits(byte >> 4, (r2 >> 8) & 0xFF, table, BF16)
        if F32:
            tl.store(out + 2 * j, _f4_float(lo, BF16), mask=m)
            tl.store(out + 2 * j + 1, _f4_float(hi, BF16), mask=m)
        else:  # one int32 store per pair, element 2j in the low half
            tl.store(out32 + j, (lo & 0xFFFF) | (hi << 16), mask=m)
    else:
        e = pid * BLOCK + tl.arange(0, BLOCK)
        m = e < N
        byte = tl.load(nib + (e >> 1), mask=m, other=0).to(tl.int32)
        rank = (byte >> ((e & 1) * 4).to(tl.int32)) & 15
        bits = _f4_bits(rank, tl.load(raw + e, mask=m, other=0).to(tl.int32), table, BF16)
        if F32:
            tl.store(out + e, _f4_float(bits, BF16), mask=m)
        else:
            tl.store(out + e, bits.to(tl.int16), mask=m)


@triton.jit
def _f4_escape_decode_kernel(raw, out, esc_index, esc_symbol, E, BF16: tl.constexpr, F32: tl.constexpr,
                             BLOCK: tl.constexpr):
    """Second pass of decode: each escape's own symbol, after the main pass wrote table[15] there."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < E
    idx = tl.load(esc_index + i, mask=m, other=0).to(tl.int64)
    sym = tl.load(esc_symbol + i, mask=m, other=0).to(tl.int32)
    r = tl.load(raw + idx, mask=m, other=0).to(tl.int32)
    bits = _join32(sym, r, BF16)
    if F32:
        tl.store(out + idx, _f4_float(bits, BF16), mask=m)
    else:
        tl.store(out + idx, bits.to(tl.int16), mask=m)


@triton.jit
def _f4_escapes(acc, raw, x, esc_index, esc_symbol, row_ptr, n0, IN, OUT, B, stride_x, BF16: tl.constexpr,
                BP: tl.constexpr, BLOCK_N: tl.constexpr, ESC_BLOCK: tl.constexpr):
    """acc[b, r - n0] += x[b, col] * w for the escapes of rows n0 .. n0 + BLOCK_N (row_ptr: CSR by row)."""
    lo = tl.load(row_ptr + n0)
    hi = tl.load(row_ptr + tl.minimum(n0 + BLOCK_N, OUT))
    b = tl.arange(0, BP)
    for e0 in range(lo, hi, ESC_BLOCK):
        ei = e0 + tl.arange(0, ESC_BLOCK)
        em = ei < hi
        idx = tl.load(esc_index + ei, mask=em, other=0).to(tl.int64)
        sym = tl.load(esc_symbol + ei, mask=em, other=0).to(tl.int32)
        r = tl.load(raw + idx, mask=em, other=0).to(tl.int32)
        w = _f4_float(_join32(sym, r, BF16), BF16)
        row = (idx // IN - n0).to(tl.int32)
        xv = tl.load(x + b[:, None] * stride_x + (idx % IN)[None, :], mask=(b < B)[:, None] & em[None, :],
                     other=0.0).to(tl.float32)
        hit = (row[:, None] == tl.arange(0, BLOCK_N)[None, :]) & em[:, None]  # [E, BLOCK_N]
        # where, not a product with a one-hot: an escape may be Inf/NaN and must reach its own row only
        acc += tl.sum(tl.where(hit[None, :, :], (xv * w[None, :])[:, :, None], 0.0), axis=1)
    return acc


@triton.jit
def _f4_matvec_kernel(table, nib, raw, raw16, x, y, esc_index, esc_symbol, row_ptr, B, IN, OUT, stride_x, stride_y,
                      BF16: tl.constexpr, PAIRED: tl.constexpr, BP: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, ESC_BLOCK: tl.constexpr, DOT: tl.constexpr):
    """y[:B, rows] = x W[rows].T for BLOCK_N rows, over this program's share of the columns (SPLIT_K > 1: fp32
    atomics into a zeroed y). Multiply-accumulate in fp32 (DOT: on tensor cores as tf32, exact for x at the coded
    16-bit type; BP and BLOCK_N >= 16); escapes counted as 0, then added from the CSR list."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n0 = pid_n * BLOCK_N
    rows = n0 + tl.arange(0, BLOCK_N)
    rmask = rows < OUT
    rows64 = rows.to(tl.int64)
    b = tl.arange(0, BP)
    bmask = b < B
    acc = tl.zeros([BP, BLOCK_N], tl.float32)
    chunk = tl.cdiv(tl.cdiv(IN, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_k * chunk
    k_hi = tl.minimum(k_lo + chunk, IN)
    if PAIRED:  # IN even: nibble byte j and raw pair j of a row hold its columns 2j and 2j + 1
        for j0 in range(k_lo // 2, k_hi // 2, BLOCK_K // 2):
            j = j0 + tl.arange(0, BLOCK_K // 2)
            jm = j < k_hi // 2
            m = rmask[:, None] & jm[None, :]
            off = rows64[:, None] * (IN // 2) + j[None, :]
            byte = tl.load(nib + off, mask=m, other=0).to(tl.int32)
            r2 = tl.load(raw16 + off, mask=m, other=0).to(tl.int32)
            w_lo = tl.where(m, _f4_weight(byte & 15, r2 & 0xFF, table, BF16), 0.0)
            w_hi = tl.where(m, _f4_weight(byte >> 4, (r2 >> 8) & 0xFF, table, BF16), 0.0)
            xp = x + b[:, None] * stride_x + 2 * j[None, :]
            xm = bmask[:, None] & jm[None, :]
            xe = tl.load(xp, mask=xm, other=0.0).to(tl.float32)
            xo = tl.load(xp + 1, mask=xm, other=0.0).to(tl.float32)
            if DOT:  # bf16/fp16 values are exact in tf32, so these products are exact, as in the FMA path
                acc = tl.dot(xe, tl.trans(w_lo), acc, input_precision="tf32")
                acc = tl.dot(xo, tl.trans(w_hi), acc, input_precision="tf32")
            else:
                acc += tl.sum(xe[:, None, :] * w_lo[None, :, :], axis=2)
                acc += tl.sum(xo[:, None, :] * w_hi[None, :, :], axis=2)
    else:  # odd IN: a row's first element may sit in a high nibble
        for k0 in range(k_lo, k_hi, BLOCK_K):
            c = k0 + tl.arange(0, BLOCK_K)
            cm = c < k_hi
            m = rmask[:, None] & cm[None, :]
            e = rows64[:, None] * IN + c[None, :]
            byte = tl.load(nib + (e >> 1), mask=m, other=0).to(tl.int32)
            rank = (byte >> ((e & 1) * 4).to(tl.int32)) & 15
            w = tl.where(m, _f4_weight(rank, tl.load(raw + e, mask=m, other=0).to(tl.int32), table, BF16), 0.0)
            xv = tl.load(x + b[:, None] * stride_x + c[None, :], mask=bmask[:, None] & cm[None, :],
                         other=0.0).to(tl.float32)
            acc += tl.sum(xv[:, None, :] * w[None, :, :], axis=2)
    if pid_k == 0:
        acc = _f4_escapes(acc, raw, x, esc_index, esc_symbol, row_ptr, n0, IN, OUT, B, stride_x, BF16, BP, BLOCK_N,
                          ESC_BLOCK)
    yp = y + b[:, None] * stride_y + rows[None, :]
    ym = bmask[:, None] & rmask[None, :]
    if SPLIT_K == 1:
        tl.store(yp, acc.to(y.dtype.element_ty), mask=ym)
    else:
        tl.atomic_add(yp, acc, mask=ym)


def _nonempty(t: torch.Tensor) -> torch.Tensor:
    """Triton wants a real pointer even where nothing is read."""
    return t if t.numel() else torch.zeros(1, dtype=t.dtype, device=t.device)


def _pairs(a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """a (1-D, even length) viewed as pairs, or None where its storage is not aligned for that."""
    if a.numel() % 2 or a.data_ptr() % (2 * a.element_size()):
        return None
    return a.view(dtype)


def coded_dtype(t) -> str:
    """The 16-bit format of a fixed4 holder: `coded` (dn_torch.codec.CodecLinear) or `dtype` (fixed4.Lossless)."""
    return getattr(t, "coded", None) or t.dtype


def fixed4_decode(t, out: torch.Tensor | None = None) -> torch.Tensor:
    """A fixed4 tensor on the device -> its weights, bit-exact with dn.formats.fixed4.decode: int16 bits [n], or
    into out[:n] when given as int16, the coded dtype (the same bits) or float32 (the exact upcast). t: anything
    holding the fixed4.Lossless fields as torch tensors (table, nibbles, raw, esc_index, esc_symbol) and
    `coded` or `dtype` naming the format."""
    n = t.raw.numel()
    out = torch.empty(n, dtype=torch.int16, device=t.raw.device) if out is None else out[:n]
    bf16 = coded_dtype(t) == "bfloat16"
    f32 = out.dtype == torch.float32
    dst = out if f32 else out.view(torch.int16)  # bf16/fp16 out: the same bits
    raw16 = _pairs(t.raw, torch.int16)
    out32 = dst if f32 else _pairs(dst, torch.int32)
    paired = raw16 is not None and out32 is not None
    block = 1024
    grid = (triton.cdiv(n // 2 if paired else n, block),)
    _f4_decode_kernel[grid](t.table, t.nibbles, t.raw, raw16 if paired else t.raw, dst, out32 if paired else dst,
                            n, BF16=bf16, PAIRED=paired, F32=f32, BLOCK=block)
    e = t.esc_index.numel()
    if e:
        _f4_escape_decode_kernel[(triton.cdiv(e, 256),)](t.raw, dst, t.esc_index, t.esc_symbol, e, BF16=bf16,
                                                         F32=f32, BLOCK=256)
    return out


def row_pointers(t, n_out: int, n_in: int) -> torch.Tensor:
    """int32 [out + 1]: escapes of row r are esc_index[ptr[r]:ptr[r + 1]] (the list is ascending). Derived once
    per tensor and kept on it: 4 bytes per row, about 0.001 bits per weight at 4096 columns."""
    cached = getattr(t, "_dn_row_ptr", None)
    if cached is None or cached.device != t.esc_index.device or cached.numel() != n_out + 1:
        starts = torch.arange(n_out + 1, device=t.esc_index.device, dtype=torch.int64) * n_in
        cached = torch.searchsorted(t.esc_index.long(), starts).to(torch.int32)
        t._dn_row_ptr = cached
    return cached


def fixed4_config(batch: int) -> dict:
    """Tile sizes per batch: the [batch, rows, columns / 2] product tile stays at <= 4096 floats per program.
    DOT (tensor cores) is off by default until a GPU measures it (scripts/gpu_check.py sweeps it)."""
    bp = triton.next_power_of_2(max(1, batch))
    block_n = 8
    return {"BLOCK_N": block_n, "BLOCK_K": min(512, 8192 // (bp * block_n)), "SPLIT_K": 1, "DOT": False}


def fixed4_matvec(t, x: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """y = x @ W.T for a fixed4 W [out, in] (t as in fixed4_decode, t.shape its shape) and x [B, in], B <= 16,
    decoding W in registers: one kernel launch (two with SPLIT_K > 1: the cast). Sums in float32 in another order
    than cuBLAS: close to dn.formats.fixed4.matvec (within dn.core.tolerances.KERNEL), not bit-identical. (Triton's
    interpreter truncates the float32 -> bf16/fp16 cast of y, where a GPU rounds to nearest.)"""
    n_out, n_in = t.shape
    if x.dim() != 2 or x.shape[1] != n_in or not 1 <= x.shape[0] <= 16:
        raise ValueError(f"fixed4_matvec: x must be [1..16, {n_in}], got {list(x.shape)}")
    cfg = fixed4_config(x.shape[0]) | (config or {})
    xc = x.contiguous()
    split = cfg["SPLIT_K"]
    y = (torch.zeros if split > 1 else torch.empty)(x.shape[0], n_out, dtype=torch.float32 if split > 1 else x.dtype,
                                                    device=x.device)
    raw16 = _pairs(t.raw, torch.int16) if n_in % 2 == 0 else None
    # tensor cores (tf32, exact for 16-bit x) in the paired layout; elsewhere DOT falls back to fp32 FMAs
    dot = bool(cfg.get("DOT")) and raw16 is not None and x.dtype == DTYPES[coded_dtype(t)]
    if dot and (cfg["BLOCK_N"] < 16 or cfg["BLOCK_K"] < 32):
        raise ValueError(f"fixed4_matvec: DOT needs BLOCK_N >= 16 and BLOCK_K >= 32, got {cfg}")
    bp = max(16 if dot else 1, triton.next_power_of_2(x.shape[0]))
    grid = (triton.cdiv(n_out, cfg["BLOCK_N"]), split)
    _f4_matvec_kernel[grid](t.table, t.nibbles, t.raw, t.raw if raw16 is None else raw16, xc, y,
                            _nonempty(t.esc_index), _nonempty(t.esc_symbol), row_pointers(t, n_out, n_in),
                            x.shape[0], n_in, n_out, xc.stride(0), y.stride(0), BF16=coded_dtype(t) == "bfloat16",
                            PAIRED=raw16 is not None, BP=bp, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                            SPLIT_K=split, ESC_BLOCK=16, DOT=dot, num_warps=cfg.get("num_warps", 4))
    return y if split == 1 else y.to(x.dtype)
