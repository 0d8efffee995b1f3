// Fused fixed4 decode + GEMV, main pass: y[b, r] = sum_c x[b, c] * W[r, c], where escaped weights count as 0
// (the caller adds their corrections: dn.formats.fixed4.matvec's second pass). Body for mx.fast.metal_kernel.
// Inputs: nibbles uint32 [ceil(N/8)] (element e's rank is nibble e % 8 of word e / 8), raw uint32 [2 ceil(N/8)]
//         (its raw byte is byte e % 4 of word e / 4), table uint8 [16], x float [B, K]. Output: y float [B, ROWS].
// Template: K, ROWS, B (<= 16), BF16. Grid: whole threadgroups of a multiple of 32 threads; simdgroup s of the
// grid computes row s (rows past ROWS compute nothing). No serial dependency: every weight decodes from its own
// nibble and raw byte, in registers.
uint lane = thread_index_in_simdgroup;
uint tid = thread_position_in_threadgroup.x;
uint row = thread_position_in_grid.x / 32;

threadgroup uint8_t tab[16];
if (tid < 16) {
  tab[tid] = table[tid];
}
threadgroup_barrier(mem_flags::mem_threadgroup);

float acc[B];
for (int b = 0; b < B; ++b) {
  acc[b] = 0.0f;
}
if (row < uint(ROWS)) {
  ulong e0 = ulong(row) * K;
  if (K % 8 == 0) {
    // 8 weights per step: one nibble word and two raw words, all aligned (e0 and c are multiples of 8).
    for (uint c = lane * 8; c < uint(K); c += 256) {
      ulong e = e0 + c;
      uint nw = nibbles[e >> 3];
      uint rw[2] = {raw[e >> 2], raw[(e >> 2) + 1]};
      float w[8];
      for (int i = 0; i < 8; ++i) {
        uint rank = (nw >> (4 * i)) & 15u;
        float v = dn_bits_to_float(dn_join(tab[rank], (rw[i >> 2] >> (8 * (i & 3))) & 255u, BF16), BF16);
        w[i] = rank == 15u ? 0.0f : v;
      }
      for (int b = 0; b < B; ++b) {
        float s = 0.0f;
        for (int i = 0; i < 8; ++i) {
          s += x[b * K + c + i] * w[i];
        }
        acc[b] += s;
      }
    }
  } else {
    for (uint c = lane; c < uint(K); c += 32) {
      ulong e = e0 + c;
      uint rank = (nibbles[e >> 3] >> (4 * (e & 7))) & 15u;
      float v = dn_bits_to_float(dn_join(tab[rank], (raw[e >> 2] >> (8 * (e & 3))) & 255u, BF16), BF16);
      float w = rank == 15u ? 0.0f : v;
      for (int b = 0; b < B; ++b) {
        acc[b] += x[b * K + c] * w;
      }
    }
  }
}
// The row is the same for the whole simdgroup: every lane reaches simd_sum.
for (int b = 0; b < B; ++b) {
  float v = simd_sum(acc[b]);
  if (lane == 0 && row < uint(ROWS)) {
    y[b * ROWS + row] = v;
  }
}
