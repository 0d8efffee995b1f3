// Decode a dn.formats.lossless Pack (one or more coded tensors) to uint16 bits. Body for mx.fast.metal_kernel.
// Inputs: words uint32 [W], offsets uint32 [S], luts uint16 [NT << MAXLEN], raw uint8 [n],
//         table int64 [NT, 4] = (first stream, word base, output start, n) per tensor.
// Output: out uint16 [n]. Template: LANES, STEPS, MAXLEN, NT (tensors), BF16.
// Grid: S threads (one per lane stream), threadgroups of LANES threads = one tile each.
uint tile = threadgroup_position_in_grid.x;
uint lane = thread_position_in_threadgroup.x;
uint stream = tile * LANES + lane;

// Every tensor owns whole tiles, so the threadgroup's tensor k is uniform.
int k = 0;
for (int j = 1; j < NT; ++j) {
  if (uint(table[4 * j]) <= tile * LANES) {
    k = j;
  }
}
// The tensor's LUT, staged once per threadgroup (2 << MAXLEN bytes, 8 KiB at MAXLEN 12).
threadgroup uint16_t lut[1 << MAXLEN];
for (uint i = lane; i < (1u << MAXLEN); i += LANES) {
  lut[i] = luts[(uint(k) << MAXLEN) + i];
}
threadgroup_barrier(mem_flags::mem_threadgroup);

uint local_tile = tile - uint(table[4 * k]) / LANES;
long first = long(local_tile) * (LANES * STEPS) + long(lane);  // this lane's first element in the tensor
long rem = table[4 * k + 3] - first;
int count = rem <= 0 ? 0 : int(dn_min(long(STEPS), (rem + LANES - 1) / LANES));
ulong o = ulong(table[4 * k + 2] + first);

DnBits bits = dn_bits_start(words, ulong(table[4 * k + 1]), offsets[stream]);
for (int s = 0; s < count; ++s) {
  uint sym = dn_bits_next<MAXLEN>(bits, words, lut);
  // At step s the LANES threads write LANES consecutive outputs: coalesced.
  ulong at = o + ulong(s) * LANES;
  out[at] = dn_join(sym, uint(raw[at]), BF16);
}
