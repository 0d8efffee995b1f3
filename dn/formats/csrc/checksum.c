/* The cold tier's block checksums (dn/runtime/residency/cold.py `checksum`, the numpy reference): per block of a
   tensor laid out [outer, blocks, inner] in a larger file (rows `stride` bytes apart), the sum of its words (the
   widest of 8, 4, 2 or 1 bytes dividing inner), wrapping at 64 bits. One pass at memory speed on the reading
   thread; numpy's sum over a strided view of 16-bit words (a GGUF's Q6_K rows) runs at a tenth of it. Each
   segment of a row is summed in a narrower accumulator that cannot overflow (inner < 2^16 words), so the loops
   vectorize; segments are assumed aligned to their word (the file's offsets are). */
#include <stdint.h>

#define SEGMENT(T, ACC)                                                              \
    static uint64_t seg_##T(const uint8_t *p, int64_t n) {                           \
        const T *w = (const T *)p;                                                   \
        ACC s = 0;                                                                   \
        for (int64_t j = 0; j < n; j++) s += w[j];                                   \
        return (uint64_t)s;                                                          \
    }
SEGMENT(uint8_t, uint32_t)
SEGMENT(uint16_t, uint32_t)
SEGMENT(uint32_t, uint64_t)
SEGMENT(uint64_t, uint64_t)

int dn_block_sums(const uint8_t *base, int64_t outer, int64_t stride, int64_t blocks, int64_t inner, uint64_t *out) {
    int word = inner % 8 == 0 ? 8 : inner % 4 == 0 ? 4 : inner % 2 == 0 ? 2 : 1;
    if (word < 4 && inner / word >= 65536) return 1; /* a narrow accumulator could overflow: the caller's numpy */
    for (int64_t b = 0; b < blocks; b++) {
        uint64_t s = 0;
        for (int64_t o = 0; o < outer; o++) {
            const uint8_t *p = base + o * stride + b * inner;
            switch (word) {
                case 8: s += seg_uint64_t(p, inner / 8); break;
                case 4: s += seg_uint32_t(p, inner / 4); break;
                case 2: s += seg_uint16_t(p, inner / 2); break;
                default: s += seg_uint8_t(p, inner);
            }
        }
        out[b] = s;
    }
    return 0;
}
