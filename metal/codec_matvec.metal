// Fused decode + GEMV partials: y[b, r] = sum_c x[b, c] * W[r, c] without ever writing W.
// Body for mx.fast.metal_kernel. One coded 2-D tensor W [N / K, K] (a one-tensor Pack).
// Inputs: words uint32, offsets uint32 [S], lut uint16 [1 << MAXLEN], raw uint8 [N], x float [B, K].
// Output: partial float [n_tiles * SLOTS, B]: row (tile, r - first row of tile) holds this tile's share
//         of y[:, r]; the caller sums the shares of a row over the (few) tiles that cover it.
// Template: LANES (multiple of 32), STEPS, MAXLEN, BF16, K (>= LANES), N, B (<= LANES), SLOTS.
// Grid: S threads, threadgroups of LANES threads = one tile each.
uint tile = threadgroup_position_in_grid.x;
uint lane = thread_position_in_threadgroup.x;
uint sg = simdgroup_index_in_threadgroup;
uint sl = thread_index_in_simdgroup;

threadgroup uint16_t lut_tg[1 << MAXLEN];
threadgroup float red[(LANES / 32) * B];
for (uint i = lane; i < (1u << MAXLEN); i += LANES) {
  lut_tg[i] = lut[i];
}
threadgroup_barrier(mem_flags::mem_threadgroup);

long t0 = long(tile) * (LANES * STEPS);  // first element of the tile
long rem = long(N) - t0 - long(lane);
int count = rem <= 0 ? 0 : int(dn_min(long(STEPS), (rem + LANES - 1) / LANES));
DnBits bits = dn_bits_start(words, 0, offsets[tile * LANES + lane]);

// At step s the tile covers elements [c0, c0 + LANES): with K >= LANES that is row r0 (acc) and
// possibly row r0 + 1 (nxt). Whether a row ends at this step is the same for every thread, so the
// reductions below run in uniform control flow.
float acc[B];
float nxt[B];
for (int b = 0; b < B; ++b) {
  acc[b] = 0.0f;
  nxt[b] = 0.0f;
}
long row_first = t0 / K;
long r0 = row_first;
for (int s = 0; s < STEPS; ++s) {
  long c0 = t0 + long(s) * LANES;
  if (c0 >= N) {
    break;
  }
  if (s < count) {
    long e = c0 + lane;
    uint sym = dn_bits_next<MAXLEN>(bits, words, lut_tg);
    float w = dn_bits_to_float(dn_join(sym, uint(raw[e]), BF16), BF16);
    long r = e / K;
    long c = e - r * K;
    for (int b = 0; b < B; ++b) {
      float v = x[long(b) * K + c] * w;
      if (r == r0) {
        acc[b] += v;
      } else {
        nxt[b] += v;
      }
    }
  }
  long end = dn_min(c0 + LANES, long(N));  // one past the chunk
  bool last = s == STEPS - 1 || end >= N;
  bool row_done = last || end / K != r0;
  int flushes = !row_done ? 0 : (last && (end - 1) / K != r0 ? 2 : 1);
  for (int f = 0; f < flushes; ++f) {
    // Sum acc over the threadgroup: simd_sum per simdgroup, then across simdgroups in `red`.
    for (int b = 0; b < B; ++b) {
      float v = simd_sum(acc[b]);
      if (sl == 0) {
        red[sg * B + b] = v;
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (lane < B) {
      float t = 0.0f;
      for (int g = 0; g < LANES / 32; ++g) {
        t += red[g * B + lane];
      }
      partial[(long(tile) * SLOTS + (r0 - row_first)) * B + lane] = t;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int b = 0; b < B; ++b) {
      acc[b] = nxt[b];
      nxt[b] = 0.0f;
    }
    r0 += 1;
  }
}
