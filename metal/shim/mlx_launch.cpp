// Runtime of the launch stand-in declared in mlx_launch.h (compiled once, linked with each kernel).
// System headers first: metal_shim.h defines Metal's address-space words (`constant`, ...) away.
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "mlx_launch.h"

namespace launch {

namespace {
std::string g_dir;
int g_order = 0;
uint g_grid = 0, g_group = 0;
std::vector<size_t> g_sizes;
std::vector<std::pair<void*, size_t>> g_outputs;  // (block, bytes)
}  // namespace

void start(int argc, char** argv, int n_outputs) {
  if (argc != 5 + n_outputs) {
    shim::fail("usage: exe DIR ORDER GRID THREADGROUP OUT_SIZE... (argc, expected)", unsigned(argc),
               unsigned(5 + n_outputs));
  }
  g_dir = argv[1];
  g_order = std::atoi(argv[2]);
  g_grid = uint(std::strtoul(argv[3], nullptr, 10));
  g_group = uint(std::strtoul(argv[4], nullptr, 10));
  for (int i = 0; i < n_outputs; ++i) g_sizes.push_back(std::strtoull(argv[5 + i], nullptr, 10));
  g_outputs.assign(size_t(n_outputs), {nullptr, 0});
  if (g_grid == 0 || g_group == 0) shim::fail("empty grid or threadgroup (grid, group)", g_grid, g_group);
}

const void* input(const char* name, size_t elem_size) {
  std::ifstream f(g_dir + "/" + name + ".bin", std::ios::binary);
  if (!f) shim::fail("missing input file");
  std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (bytes.empty() || bytes.size() % elem_size) shim::fail("input size (bytes, element size)", bytes.size(), elem_size);
  void* p = std::malloc(bytes.size());
  std::memcpy(p, bytes.data(), bytes.size());
  return p;
}

void* output(int i, size_t elem_size) {
  size_t n = g_sizes.at(size_t(i)) * elem_size;
  auto* p = static_cast<unsigned char*>(std::malloc(n));
  const uint32_t poison = 0xFFC0DEADu;  // a NaN as float32; 0xDEAD / 0xFFC0 as 16-bit words
  for (size_t b = 0; b < n; ++b) p[b] = (poison >> (8 * (b % 4))) & 0xFF;
  g_outputs[size_t(i)] = {p, n};
  return p;
}

void save(const char* name, int i) {
  std::ofstream f(g_dir + "/" + name + ".bin", std::ios::binary);
  f.write(static_cast<const char*>(g_outputs[size_t(i)].first), std::streamsize(g_outputs[size_t(i)].second));
}

void dispatch(void (*kernel)(const Thread&)) {
  uint grid = g_grid, group = g_group < grid ? g_group : grid;
  for (uint tg = 0; tg * group < grid; ++tg) {
    uint n = grid - tg * group < group ? grid - tg * group : group;
    shim::run_group(int(n), g_order, [&](uint tid) {
      kernel(Thread{{tg * group + tid, 0, 0}, {tid, 0, 0}, {tg, 0, 0}, {grid, 1, 1}, tid, tid / 32, tid % 32});
    });
  }
}

}  // namespace launch
