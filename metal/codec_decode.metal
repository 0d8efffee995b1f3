// dn lossless codec, format 1: decode one stream per thread (body for mx.fast.metal_kernel).
// Template: LANES, MAXLEN, BF16, STREAMS. Threadgroup = LANES threads = the lanes of one tile, so at
// each step the threadgroup writes LANES consecutive outputs (coalesced).
uint i = thread_position_in_grid.x;
if (i >= (uint)STREAMS) {
    return;
}
uint pos = bitpos[i];
uint lb = lut_base[i];
uint ob = out_base[i];
uint cnt = count[i];
for (uint s = 0; s < cnt; ++s) {
    uint w = pos >> 5;
    ulong window = ((ulong)words[w] << 32) | (ulong)words[w + 1];
    uint idx = (uint)(window >> (64 - MAXLEN - (pos & 31))) & ((1u << MAXLEN) - 1u);
    uint e = luts[lb + idx];
    uint sym = e & 0xFFu;
    uint o = ob + s * (uint)LANES;
    uint r = raw[o];
    uint bits = BF16 ? (((r & 0x80u) << 8) | (sym << 7) | (r & 0x7Fu)) : ((sym << 8) | r);
    out[o] = (ushort)bits;
    pos += e >> 8;
}
