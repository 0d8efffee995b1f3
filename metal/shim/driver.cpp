// Host driver: runs a codec kernel body (compiled as C++ through metal_shim.h) over its whole grid.
// Build: g++ -std=c++17 -I metal/shim -DDN_KERNEL_DECODE|-DDN_KERNEL_MATVEC -DT_LANES=.. (see tests).
// Usage: driver DIR ORDER  -- reads DIR/<input>.bin, writes DIR/<output>.bin (raw little-endian arrays).
#include <fstream>
#include <iterator>
#include <string>

#include "metal_shim.h"
#include "../codec_common.h"

static std::string g_dir;

template <class T>
static std::vector<T> load(const char* name) {
  std::ifstream f(g_dir + "/" + name + ".bin", std::ios::binary);
  if (!f) shim::fail("missing input file");
  std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  std::vector<T> v(bytes.size() / sizeof(T));
  std::memcpy(v.data(), bytes.data(), v.size() * sizeof(T));
  return v;
}

template <class T>
static void save(const char* name, const std::vector<T>& v) {
  std::ofstream f(g_dir + "/" + name + ".bin", std::ios::binary);
  f.write(reinterpret_cast<const char*>(v.data()), std::streamsize(v.size() * sizeof(T)));
}

template <class T>
static Buf<const T> in(const std::vector<T>& v) {
  return Buf<const T>{v.data(), v.size()};
}

// The attribute arguments mx.fast.metal_kernel adds when a body names them.
#define DN_ATTRS                                                                                   \
  uint3 threadgroup_position_in_grid, uint3 thread_position_in_threadgroup,                       \
      uint3 thread_position_in_grid, uint simdgroup_index_in_threadgroup, uint thread_index_in_simdgroup

// Tests compile mutated copies of a body to show the check can fail.
#ifndef DN_DECODE_BODY
#define DN_DECODE_BODY "../codec_decode.metal"
#endif
#ifndef DN_MATVEC_BODY
#define DN_MATVEC_BODY "../codec_matvec.metal"
#endif

// MLX's template arguments become constants of one build (-DT_<NAME>=...): a plain function, not a
// template, so its threadgroup statics land in the poisoned section (GCC files template statics elsewhere).
#ifdef DN_KERNEL_DECODE
void codec_decode(Buf<const uint32_t> words, Buf<const uint32_t> offsets, Buf<const uint16_t> luts,
                  Buf<const uint8_t> raw, Buf<const int64_t> table, Buf<uint16_t> out, DN_ATTRS) {
  constexpr int LANES = T_LANES, STEPS = T_STEPS, MAXLEN = T_MAXLEN, NT = T_NT;
  constexpr bool BF16 = T_BF16;
#include DN_DECODE_BODY
}
#endif

#ifdef DN_KERNEL_MATVEC
void codec_matvec(Buf<const uint32_t> words, Buf<const uint32_t> offsets, Buf<const uint16_t> lut,
                  Buf<const uint8_t> raw, Buf<const float> x, Buf<float> partial, DN_ATTRS) {
  constexpr int LANES = T_LANES, STEPS = T_STEPS, MAXLEN = T_MAXLEN;
  constexpr int K = T_K, N = T_N, B = T_B, SLOTS = T_SLOTS;
  constexpr bool BF16 = T_BF16;
#include DN_MATVEC_BODY
}
#endif

int main(int argc, char** argv) {
  if (argc != 3) shim::fail("usage: driver DIR ORDER");
  g_dir = argv[1];
  int order = std::atoi(argv[2]);
  auto words = load<uint32_t>("words");
  auto offsets = load<uint32_t>("offsets");
  auto raw = load<uint8_t>("raw");
  if (offsets.size() % T_LANES) shim::fail("streams not a whole number of tiles");
  uint groups = uint(offsets.size() / T_LANES);
#ifdef DN_KERNEL_DECODE
  auto luts = load<uint16_t>("luts");
  auto table = load<int64_t>("table");
  std::vector<uint16_t> out(raw.size(), 0xDEAD);  // poison: every element must be written
  for (uint tg = 0; tg < groups; ++tg) {
    shim::run_group(T_LANES, order, [&](uint tid) {
      codec_decode(
          in(words), in(offsets), in(luts), in(raw), in(table), Buf<uint16_t>{out.data(), out.size()},
          uint3{tg, 0, 0}, uint3{tid, 0, 0}, uint3{tg * T_LANES + tid, 0, 0}, tid / 32, tid % 32);
    });
  }
  save("out", out);
#else
  auto lut = load<uint16_t>("luts");
  auto x = load<float>("x");
  std::vector<float> partial(size_t(groups) * T_SLOTS * T_B, __builtin_nanf(""));  // poison
  for (uint tg = 0; tg < groups; ++tg) {
    shim::run_group(T_LANES, order, [&](uint tid) {
      codec_matvec(
          in(words), in(offsets), in(lut), in(raw), in(x), Buf<float>{partial.data(), partial.size()},
          uint3{tg, 0, 0}, uint3{tid, 0, 0}, uint3{tg * T_LANES + tid, 0, 0}, tid / 32, tid % 32);
    });
  }
  save("partial", partial);
#endif
  return 0;
}
