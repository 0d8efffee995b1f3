// Host stand-in for one mx.fast.metal_kernel launch with a 1-D grid. tests/test_metal_sparse_host.py writes a
// translation unit holding the body inside the signature MLX generates for it (raw `const device T*` inputs,
// `device T*` outputs, the attributes the body names) and a main() that loads the buffers and calls
// launch::dispatch; it links with mlx_launch.cpp (compiled once).
// Usage: exe DIR ORDER GRID THREADGROUP OUT_SIZE...  -- reads DIR/<input>.bin, writes DIR/<output>.bin.
// Every buffer is a heap block of exactly its size: the tests build with -fsanitize=address, which reports any
// read or write outside one (MLX passes raw pointers and bodies do pointer arithmetic, so shim::Buf cannot be
// used here).
#pragma once
#include <cstddef>

#include "metal_shim.h"

namespace launch {

// The attribute values of one thread (MSL names; the grid is 1-D, so only x varies).
struct Thread {
  uint3 thread_position_in_grid, thread_position_in_threadgroup, threadgroup_position_in_grid, threads_per_grid;
  uint thread_index_in_threadgroup, simdgroup_index_in_threadgroup, thread_index_in_simdgroup;
};

void start(int argc, char** argv, int n_outputs);
// DIR/<name>.bin, a whole number of elem_size-byte elements.
const void* input(const char* name, size_t elem_size);
// Output i (OUT_SIZE elements), poisoned (NaN float32 words): MLX does not initialise outputs.
void* output(int i, size_t elem_size);
void save(const char* name, int i);
// MLX dispatches dispatchThreads(grid, min(threadgroup, grid)): ceil(grid / group) threadgroups, the last one
// short when the group size does not divide the grid. Threadgroups run one after another, the threads of
// each as shim coroutines in the requested order.
void dispatch(void (*kernel)(const Thread&));

}  // namespace launch
