// Host shim for CUDA kernel bodies (mx.fast.cuda_kernel): just enough CUDA to compile dn's fixed4 body as C++17
// and run it on the CPU over a whole grid, on metal_shim.h's coroutine threads. A block is a threadgroup of the
// shim: __syncthreads is its barrier, __shfl_xor_sync a real collective of the 32 lanes of a warp (a shuffle in
// divergent control flow deadlocks and fails the run), __shared__ arrays are poisoned before every block.
// Used by tests/test_metal_fixed4_host.py, which writes the kernel text MLX generates around the body.
#pragma once
#include "metal_shim.h"

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ threadgroup

namespace cooperative_groups {}  // MLX's generated source names it (namespace cg = cooperative_groups)

struct dim3 {
  uint x, y, z;
};

namespace cuda_shim {
inline uint g_block = 0, g_block_dim = 0, g_grid_dim = 0;
inline dim3 thread_idx() { return dim3{uint(shim::g_group->cur), 0, 0}; }
}  // namespace cuda_shim

#define threadIdx (::cuda_shim::thread_idx())
#define blockIdx (::dim3{::cuda_shim::g_block, 0, 0})
#define blockDim (::dim3{::cuda_shim::g_block_dim, 1, 1})
#define gridDim (::dim3{::cuda_shim::g_grid_dim, 1, 1})

inline void __syncthreads(int line = __builtin_LINE()) { shim::block(shim::BARRIER, line); }

// v from lane (own lane ^ o) of the warp. Each lane posts its value, then two warp collectives (simd_sum as a
// rendezvous: every lane must arrive) separate the writes from the reads and the reads from the next writes.
inline float __shfl_xor_sync(unsigned mask, float v, int o, int line = __builtin_LINE()) {
  static float slot[1024];
  if (mask != 0xFFFFFFFFu) shim::fail("only full-warp shuffles are emulated (mask)", mask);
  if (o < 0 || o > 31) shim::fail("shuffle lane mask out of range (mask)", unsigned(o));
  uint t = uint(shim::g_group->cur);
  slot[t] = v;
  simd_sum(0.0f, line);
  float r = slot[(t & ~31u) | ((t & 31u) ^ uint(o))];
  simd_sum(0.0f, line);
  return r;
}

inline float __uint_as_float(uint32_t u) { return as_type<float>(u); }
typedef half __half;
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline float __half2float(__half h) { return float(h); }

namespace cuda_shim {
// MLX's launch: grid (gx, 1, 1) threads in blocks of min(tx, gx): ceil(gx / tx) blocks, all full size.
template <class F>
inline void dispatch(uint gx, uint tx, int order, F kernel) {
  uint block = tx < gx ? tx : gx;
  g_block_dim = block;
  g_grid_dim = (gx + tx - 1) / tx;
  for (uint b = 0; b < g_grid_dim; ++b) {
    g_block = b;
    shim::run_group(int(block), order, [&](uint) { kernel(); });
  }
}
}  // namespace cuda_shim
