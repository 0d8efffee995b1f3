"""The fused fixed4 decode + GEMV kernel for MLX's CUDA backend (mx.fast.cuda_kernel): the same algorithm as
metal/codec_fixed4.metal, one warp per row, escapes counted as 0 (dn_mlx.codec adds their corrections).
Checked on a CPU by compiling HEADER + SOURCE as C++ through metal/shim/cuda_shim.h
(tests/test_metal_fixed4_host.py); run on a GPU by tests/test_codec_mlx.py's cuda tests."""

from __future__ import annotations

import functools

INPUTS, OUTPUTS = ("nibbles", "raw", "table", "x"), ("y",)
TEMPLATE = ("K", "ROWS", "B", "BF16")

HEADER = r"""
// (symbol, raw) bytes -> the weight as float; rank 15 (an escape) -> 0.
__device__ __forceinline__ float dn_f4_weight(uint32_t rank, uint32_t sym, uint32_t raw, bool bf16) {
  float v;
  if (bf16) {
    v = __uint_as_float(((raw & 0x80u) << 24) | (sym << 23) | ((raw & 0x7Fu) << 16));
  } else {
    v = __half2float(__ushort_as_half((unsigned short)((sym << 8) | raw)));
  }
  return rank == 15u ? 0.0f : v;
}
"""

# Body: inputs nibbles uint32 [ceil(N/8)], raw uint32 [2 ceil(N/8)], table uint8 [16], x float [B, K];
# output y float [B, ROWS]. Blocks of a multiple of 32 threads; warp w of the grid computes row w. MLX's grid
# is rounded up to whole blocks, so rows past ROWS compute nothing (but join the shuffles).
SOURCE = r"""
const unsigned lane = threadIdx.x & 31u;
const unsigned row = (blockIdx.x * blockDim.x + threadIdx.x) / 32u;
__shared__ uint8_t tab[16];
if (threadIdx.x < 16) {
  tab[threadIdx.x] = table[threadIdx.x];
}
__syncthreads();

float acc[B];
for (int b = 0; b < B; ++b) {
  acc[b] = 0.0f;
}
if (row < (unsigned)ROWS) {
  const unsigned long long e0 = (unsigned long long)row * K;
  if (K % 8 == 0) {
    // 8 weights per step: one nibble word and two raw words, aligned (e0 and c are multiples of 8).
    for (unsigned c = lane * 8; c < (unsigned)K; c += 256) {
      const unsigned long long e = e0 + c;
      const uint32_t nw = nibbles[e >> 3];
      const uint32_t rw[2] = {raw[e >> 2], raw[(e >> 2) + 1]};
      float w[8];
      for (int i = 0; i < 8; ++i) {
        const uint32_t rank = (nw >> (4 * i)) & 15u;
        w[i] = dn_f4_weight(rank, tab[rank], (rw[i >> 2] >> (8 * (i & 3))) & 255u, BF16);
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
    for (unsigned c = lane; c < (unsigned)K; c += 32) {
      const unsigned long long e = e0 + c;
      const uint32_t rank = (nibbles[e >> 3] >> (4 * (e & 7))) & 15u;
      const float w = dn_f4_weight(rank, tab[rank], (raw[e >> 2] >> (8 * (e & 3))) & 255u, BF16);
      for (int b = 0; b < B; ++b) {
        acc[b] += x[b * K + c] * w;
      }
    }
  }
}
// The row is the same for the whole warp: every lane joins the shuffles.
for (int b = 0; b < B; ++b) {
  float v = acc[b];
  for (int o = 16; o > 0; o >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, o);
  }
  if (lane == 0 && row < (unsigned)ROWS) {
    y[b * ROWS + row] = v;
  }
}
"""


@functools.cache
def kernel():
    import mlx.core as mx  # late: the host tests compile this module's kernel source without MLX

    return mx.fast.cuda_kernel(name="dn_codec_fixed4", input_names=list(INPUTS), output_names=list(OUTPUTS),
                               source=SOURCE, header=HEADER)
