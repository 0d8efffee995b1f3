// Host shim: just enough of the Metal Shading Language to compile dn's kernel bodies as C++17 and run
// them over a whole grid on the CPU. Threads of one threadgroup run as coroutines (ucontext) on one OS
// thread; threadgroup_barrier and simd_sum are collectives that resume their threads only once every
// participant has arrived, so a kernel that reaches them in divergent control flow fails loudly
// (deadlock report) instead of passing. Threadgroups run one after another.
#pragma once
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

// Address-space qualifiers vanish; threadgroup arrays become statics, shared by the coroutines of the
// running threadgroup. They sit in one ELF section that run_group fills with 0xFF bytes (NaN floats,
// 0xFFFF integers) before every threadgroup, since Metal's threadgroup memory starts undefined.
#define device
#define constant
#define thread
#define threadgroup static __attribute__((section("dn_threadgroup")))

extern "C" char __start_dn_threadgroup[] __attribute__((weak));
extern "C" char __stop_dn_threadgroup[] __attribute__((weak));

typedef unsigned int uint;
typedef unsigned long ulong;
typedef unsigned short ushort;
typedef unsigned char uchar;

struct uint3 {
  uint x, y, z;
};

// IEEE binary16, converted to float exactly (subnormals, Inf, NaN included).
struct half {
  uint16_t bits;
  operator float() const {
    uint32_t s = uint32_t(bits & 0x8000u) << 16, e = (bits >> 10) & 0x1Fu, m = bits & 0x3FFu, f;
    if (e == 0x1F) {
      f = s | 0x7F800000u | (m << 13);
    } else if (e != 0) {
      f = s | ((e + 112) << 23) | (m << 13);
    } else if (m == 0) {
      f = s;
    } else {  // subnormal: normalise
      int shift = 0;
      while (!(m & 0x400u)) {
        m <<= 1;
        ++shift;
      }
      f = s | (uint32_t(113 - shift) << 23) | ((m & 0x3FFu) << 13);
    }
    float out;
    std::memcpy(&out, &f, 4);
    return out;
  }
};

// MLX's kernel preamble (metal::utils()) names the 16-bit float types float16_t and bfloat16_t; MLX writes
// them into the signatures of mx.fast.metal_kernel bodies for float16 / bfloat16 arrays.
typedef half float16_t;

// bfloat16: the top 16 bits of a float32, converted exactly.
struct bfloat16_t {
  uint16_t bits;
  operator float() const {
    uint32_t f = uint32_t(bits) << 16;
    float out;
    std::memcpy(&out, &f, 4);
    return out;
  }
};

namespace metal {
enum class mem_flags { mem_none, mem_device, mem_threadgroup, mem_texture };
inline float exp(float x) { return std::exp(x); }
}  // namespace metal

template <class To, class From>
inline To as_type(From v) {
  static_assert(sizeof(To) == sizeof(From), "as_type needs equal sizes");
  To t;
  std::memcpy(&t, &v, sizeof(To));
  return t;
}

namespace shim {

[[noreturn]] inline void fail(const char* what, unsigned long long a = 0, unsigned long long b = 0) {
  std::fprintf(stderr, "shim: %s (%llu, %llu)\n", what, a, b);
  std::exit(3);
}

// A kernel buffer argument: bounds-checked indexing, so an out-of-range read or write fails the run.
template <class T>
struct Buf {
  T* p;
  size_t n;
  T& operator[](unsigned long long i) const {
    if (i >= n) fail("buffer index out of range (index, size)", i, n);
    return p[i];
  }
};

enum Wait { RUNNING, BARRIER, SIMD, DONE };
constexpr int SIMD_WIDTH = 32;

struct Thread {
  ucontext_t uc;
  std::vector<char> stack;
  Wait wait = RUNNING;
  int site = 0;  // source line of the collective it waits in: all participants must wait in the same one
  float val = 0, result = 0;
};

struct Group {
  std::vector<Thread> th;
  ucontext_t sched;
  int cur = 0;
  std::function<void(uint)> body;
};

inline Group* g_group = nullptr;

inline Thread& self() { return g_group->th[g_group->cur]; }

inline void block(Wait w, int site) {
  Thread& t = self();
  t.wait = w;
  t.site = site;
  swapcontext(&t.uc, &g_group->sched);
}

inline void entry() {
  Group* g = g_group;
  int tid = g->cur;
  g->body(uint(tid));
  g->th[tid].wait = DONE;  // returning resumes uc_link, the scheduler
}

// Release the collectives every participant has reached; false if none can be released.
inline bool release(Group& g) {
  int n = int(g.th.size());
  bool any = false;
  for (int s0 = 0; s0 < n; s0 += SIMD_WIDTH) {
    int s1 = s0 + SIMD_WIDTH < n ? s0 + SIMD_WIDTH : n, at = 0;
    for (int i = s0; i < s1; ++i) at += g.th[i].wait == SIMD;
    if (at == 0) continue;
    if (at != s1 - s0) continue;  // some lanes elsewhere: maybe later, else the deadlock check fires
    for (int i = s0; i < s1; ++i) {
      if (g.th[i].site != g.th[s0].site) {
        fail("simd_sum reached at different lines (line, line)", g.th[s0].site, g.th[i].site);
      }
    }
    float sum = 0;  // lane order: a fixed order, where Metal's is unspecified
    for (int i = s0; i < s1; ++i) sum += g.th[i].val;
    for (int i = s0; i < s1; ++i) {
      g.th[i].result = sum;
      g.th[i].wait = RUNNING;
    }
    any = true;
  }
  if (any) return true;
  int at = 0;
  for (auto& t : g.th) at += t.wait == BARRIER;
  if (at == n) {
    for (auto& t : g.th) {
      if (t.site != g.th[0].site) {
        fail("threadgroup_barrier reached at different lines (line, line)", g.th[0].site, t.site);
      }
    }
    for (auto& t : g.th) t.wait = RUNNING;
    return true;
  }
  return false;
}

// order: 0 = threads in index order, 1 = reversed, 2+ = a seeded shuffle; between two collectives each
// thread runs to its next collective, so a race on threadgroup memory shows up as an order dependence.
inline void run_group(int n, int order, std::function<void(uint)> body) {
  static constexpr size_t STACK = 1 << 16;
  Group g;
  g.th.resize(n);
  g.body = std::move(body);
  g_group = &g;
  for (auto& t : g.th) {
    t.stack.resize(STACK);
    getcontext(&t.uc);
    t.uc.uc_stack.ss_sp = t.stack.data();
    t.uc.uc_stack.ss_size = STACK;
    t.uc.uc_link = &g.sched;
    makecontext(&t.uc, entry, 0);
  }
  if (__start_dn_threadgroup != nullptr) {
    std::memset(__start_dn_threadgroup, 0xFF, size_t(__stop_dn_threadgroup - __start_dn_threadgroup));
  }
  std::vector<int> seq(n);
  for (int i = 0; i < n; ++i) seq[i] = order == 1 ? n - 1 - i : i;
  unsigned rng = unsigned(order) * 2654435761u;
  while (true) {
    if (order >= 2) {
      for (int i = n - 1; i > 0; --i) {
        rng = rng * 1664525u + 1013904223u;
        std::swap(seq[i], seq[rng % unsigned(i + 1)]);
      }
    }
    for (int i : seq) {
      if (g.th[i].wait != RUNNING) continue;
      g.cur = i;
      swapcontext(&g.sched, &g.th[i].uc);
    }
    int done = 0;
    for (auto& t : g.th) done += t.wait == DONE;
    if (done == n) break;
    if (!release(g)) {
      fail("deadlock: a barrier or simd collective not reached by all its threads (done, n)", done, n);
    }
  }
  g_group = nullptr;
}

}  // namespace shim

using shim::Buf;

inline void threadgroup_barrier(metal::mem_flags, int line = __builtin_LINE()) {
  shim::block(shim::BARRIER, line);
}

inline float simd_sum(float v, int line = __builtin_LINE()) {
  shim::Thread& t = shim::self();
  t.val = v;
  shim::block(shim::SIMD, line);
  return t.result;
}
