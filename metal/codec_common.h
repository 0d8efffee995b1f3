// Helpers shared by the codec kernels: passed to mx.fast.metal_kernel as `header`, and included by the
// host shim (metal/shim) when the bodies are compiled as C++.
#include <metal_stdlib>
using namespace metal;

// (symbol, raw) bytes -> the 16 weight bits; the inverse of dn.formats.lossless.split.
inline uint16_t dn_join(uint sym, uint raw, bool bf16) {
  return bf16 ? uint16_t(((raw & 0x80u) << 8) | (sym << 7) | (raw & 0x7Fu)) : uint16_t((sym << 8) | raw);
}

// 16 weight bits -> float, exact for bfloat16 and float16.
inline float dn_bits_to_float(uint16_t w, bool bf16) {
  return bf16 ? as_type<float>(uint(w) << 16) : float(as_type<half>(w));
}

// MSB-first bit reader over one lane stream: `buf` holds the next `avail` bits at its top, `wi` is the
// next word to load. Refilling at avail <= 32 keeps >= 33 bits ahead, enough for any code (<= 32 bits),
// and never reads past the two zero words that close the bitstream.
struct DnBits {
  ulong buf;
  int avail;
  ulong wi;
};

template <typename W>
inline DnBits dn_bits_start(W words, ulong word_base, uint pos) {
  ulong w = word_base + (pos >> 5);
  DnBits b;
  b.buf = ((ulong(words[w]) << 32) | ulong(words[w + 1])) << (pos & 31u);
  b.avail = 64 - int(pos & 31u);
  b.wi = w + 2;
  return b;
}

// Decode one symbol through the LUT (entry = symbol | length << 8) and consume its code.
template <int MAXLEN, typename W, typename L>
inline uint dn_bits_next(thread DnBits& b, W words, L lut) {
  if (b.avail <= 32) {
    b.buf |= ulong(words[b.wi]) << (32 - b.avail);
    b.wi += 1;
    b.avail += 32;
  }
  uint e = uint(lut[uint(b.buf >> (64 - MAXLEN))]);
  uint len = e >> 8;
  b.buf <<= len;
  b.avail -= int(len);
  return e & 0xFFu;
}

inline long dn_min(long a, long b) {
  return a < b ? a : b;
}
