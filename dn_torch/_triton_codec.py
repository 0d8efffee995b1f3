"""Triton kernels for the lossless codec (CUDA/ROCm; CPU through TRITON_INTERPRET=1 in tests).

One program decodes one tile: LANES lanes, each walking its own MSB-first stream with a 64-bit bit
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
def _join(sym, raw, BF16: tl.constexpr):
    """Symbol + raw byte -> int16 bits (int32 arithmetic, truncated like a C cast)."""
    if BF16:
        bits = ((raw & 0x80) << 8) | (sym << 7) | (raw & 0x7F)
    else:
        bits = (sym << 8) | raw
    return bits.to(tl.int16)


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
