/* The lossless codec's runtime layout "fixed4" (dn/formats/fixed4.py is the specification and the reference):
 * decode into 16-bit bits or float32, and a fused decode+GEMV for batch 1..4 with the reference's two passes.
 * AVX-512 (BW+VL) does 32 weights per step: a nibble byte widened to 16 bits holds two ranks as two bytes in
 * element order, one in-register table lookup (vpshufb) gives their symbols. Other CPUs run the scalar path.
 * threads > 1 splits the work with OpenMP; at 1 no OpenMP region is entered. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX512BW__
#include <immintrin.h>
#endif

#define ESCAPE 15
#define CHUNK 65536 /* elements per OpenMP task: a multiple of 32, so every chunk starts on a nibble byte */
#define MAXB 4
/* Weights per OpenMP thread at least: below this, forking (and a second OpenMP runtime beside torch's spinning
 * on shared cores) costs more than it saves; the default model's projections (< 1M weights) run on one. */
#define PER_THREAD (1 << 21)

static int use_threads(int threads, int64_t work) {
    int64_t most = work / PER_THREAD;
    return threads < most ? threads : (int)(most > 1 ? most : 1);
}

static inline uint16_t join(uint8_t s, uint8_t r, int bf16) {
    return bf16 ? (uint16_t)(((r & 0x80) << 8) | (s << 7) | (r & 0x7F)) : (uint16_t)((s << 8) | r);
}

static inline float to_f32(uint16_t b, int bf16) {
    if (bf16) {
        uint32_t u = (uint32_t)b << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    /* float16 -> float32, exact (subnormals, Inf, NaN payloads kept) */
    uint32_t sign = (uint32_t)(b & 0x8000) << 16, e = (b >> 10) & 0x1F, m = b & 0x3FF, u;
    if (e == 0x1F) { /* NaNs come out quiet, as x86's vcvtph2ps (numpy, torch) makes them */
        u = sign | 0x7F800000u | ((m ? m | 0x200 : 0) << 13);
    } else if (e) {
        u = sign | ((e + 112) << 23) | (m << 13);
    } else if (m == 0) {
        u = sign;
    } else { /* subnormal: normalise */
        e = 113;
        while (!(m & 0x400)) {
            m <<= 1;
            e--;
        }
        u = sign | (e << 23) | ((m & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint8_t rank_at(const uint8_t *nib, int64_t i) { return (nib[i >> 1] >> ((i & 1) * 4)) & 15; }

#ifdef __AVX512BW__
/* 32 ranks from 16 nibble bytes, as bytes in element order */
static inline __m256i ranks32(const uint8_t *nib16) {
    __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)nib16));
    return _mm256_or_si256(_mm256_and_si256(w, _mm256_set1_epi16(0x000F)),
                           _mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x00F0)), 4));
}

/* 32 weights' 16-bit bits from their symbols and raw bytes */
static inline __m512i join32(__m256i sym, __m256i raw, int bf16) {
    __m512i s = _mm512_cvtepu8_epi16(sym), r = _mm512_cvtepu8_epi16(raw);
    if (!bf16) return _mm512_or_si512(_mm512_slli_epi16(s, 8), r);
    return _mm512_or_si512(_mm512_or_si512(_mm512_slli_epi16(_mm512_and_si512(r, _mm512_set1_epi16(0x80)), 8),
                                           _mm512_slli_epi16(s, 7)),
                           _mm512_and_si512(r, _mm512_set1_epi16(0x7F)));
}

static inline __m512 lo_f32(__m512i bits, int bf16) {
    __m256i h = _mm512_castsi512_si256(bits);
    return bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)) : _mm512_cvtph_ps(h);
}

static inline __m512 hi_f32(__m512i bits, int bf16) {
    __m256i h = _mm512_extracti64x4_epi64(bits, 1);
    return bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)) : _mm512_cvtph_ps(h);
}
#endif

#ifdef __AVX512VBMI__
/* 16-bit output, 64 weights per step: the symbol goes straight into the two output bytes through two 16-entry
 * tables (bf16: high byte = sign | sym >> 1, low byte = (sym & 1) << 7 | mantissa), then one byte
 * permute per 32 outputs interleaves low and high bytes. About half the instructions of the 32-wide step. */
static int64_t decode64_u16(const uint8_t *table, const uint8_t *nib, const uint8_t *raw, int64_t i, int64_t hi,
                            int bf16, uint16_t *out) {
    uint8_t th[16], tl[16], idx[2][64];
    for (int r = 0; r < 16; r++) {
        th[r] = bf16 ? table[r] >> 1 : table[r];
        tl[r] = bf16 ? (uint8_t)((table[r] & 1) << 7) : 0;
    }
    for (int j = 0; j < 32; j++)
        for (int h = 0; h < 2; h++) idx[h][2 * j] = (uint8_t)(32 * h + j), idx[h][2 * j + 1] = (uint8_t)(64 + 32 * h + j);
    __m512i TH = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)th));
    __m512i TL = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)tl));
    __m512i I0 = _mm512_loadu_si512(idx[0]), I1 = _mm512_loadu_si512(idx[1]);
    __m512i mh = _mm512_set1_epi8(bf16 ? (char)0x80 : 0), ml = _mm512_set1_epi8(bf16 ? 0x7F : (char)0xFF);
    for (; i + 64 <= hi; i += 64) {
        __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(nib + (i >> 1))));
        __m512i rk = _mm512_or_si512(_mm512_and_si512(w, _mm512_set1_epi16(0x000F)),
                                     _mm512_slli_epi16(_mm512_and_si512(w, _mm512_set1_epi16(0x00F0)), 4));
        __m512i r = _mm512_loadu_si512(raw + i);
        /* (mask & raw) | table byte: ternary-logic 0xEA */
        __m512i h = _mm512_ternarylogic_epi32(mh, r, _mm512_shuffle_epi8(TH, rk), 0xEA);
        __m512i l = _mm512_ternarylogic_epi32(ml, r, _mm512_shuffle_epi8(TL, rk), 0xEA);
        _mm512_storeu_si512((void *)(out + i), _mm512_permutex2var_epi8(l, I0, h));
        _mm512_storeu_si512((void *)(out + i + 32), _mm512_permutex2var_epi8(l, I1, h));
    }
    return i;
}
#endif

/* elements [lo, hi) of one tensor, lo even; escapes are patched by the caller */
static void decode_range(const uint8_t *table, const uint8_t *nib, const uint8_t *raw, int64_t lo, int64_t hi,
                         int bf16, int out_f32, void *out) {
    uint16_t *o16 = (uint16_t *)out;
    float *o32 = (float *)out;
    int64_t i = lo;
#ifdef __AVX512VBMI__
    if (!out_f32) i = decode64_u16(table, nib, raw, i, hi, bf16, o16);
#endif
#ifdef __AVX512BW__
    __m256i tbl = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)table));
    for (; i + 32 <= hi; i += 32) {
        __m256i sym = _mm256_shuffle_epi8(tbl, ranks32(nib + (i >> 1)));
        __m512i bits = join32(sym, _mm256_loadu_si256((const __m256i *)(raw + i)), bf16);
        if (out_f32) {
            _mm512_storeu_ps(o32 + i, lo_f32(bits, bf16));
            _mm512_storeu_ps(o32 + i + 16, hi_f32(bits, bf16));
        } else {
            _mm512_storeu_si512((void *)(o16 + i), bits);
        }
    }
#endif
    for (; i < hi; i++) {
        uint16_t b = join(table[rank_at(nib, i)], raw[i], bf16);
        if (out_f32)
            o32[i] = to_f32(b, bf16);
        else
            o16[i] = b;
    }
}

/* Decode a whole tensor of n weights into out: uint16 bits (out_f32 = 0) or float32 values (exact upcast). */
void dn_fixed4_decode(const uint8_t *table, const uint8_t *nibbles, const uint8_t *raw, int64_t n,
                      const int32_t *esc_index, const uint8_t *esc_symbol, int64_t n_esc, int bf16, int out_f32,
                      void *out, int threads) {
    int64_t chunks = (n + CHUNK - 1) / CHUNK;
    threads = use_threads(threads, n);
    if (threads <= 1 || chunks < 2) {
        decode_range(table, nibbles, raw, 0, n, bf16, out_f32, out);
    } else {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t c = 0; c < chunks; c++) {
            int64_t hi = (c + 1) * CHUNK < n ? (c + 1) * CHUNK : n;
            decode_range(table, nibbles, raw, c * CHUNK, hi, bf16, out_f32, out);
        }
    }
    for (int64_t j = 0; j < n_esc; j++) {
        int64_t i = esc_index[j];
        uint16_t b = join(esc_symbol[j], raw[i], bf16);
        if (out_f32)
            ((float *)out)[i] = to_f32(b, bf16);
        else
            ((uint16_t *)out)[i] = b;
    }
}

/* One row's dot products with B inputs: escapes count as 0 (pass 1 of the reference). */
static inline __attribute__((always_inline)) void row_dots(const uint8_t *table, const uint8_t *nib,
                                                           const uint8_t *raw, int64_t e, int64_t k, int bf16,
                                                           const float *x, int B, float *acc_out) {
    float acc[MAXB] = {0};
    int64_t j = 0;
#ifdef __AVX512BW__
    if ((e & 1) == 0) {
        __m256i tbl = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)table));
        __m512 a0[MAXB], a1[MAXB];
        for (int b = 0; b < B; b++) a0[b] = a1[b] = _mm512_setzero_ps();
        for (; j + 32 <= k; j += 32) {
            __m256i rk = ranks32(nib + ((e + j) >> 1));
            __mmask32 keep = ~_mm256_cmpeq_epi8_mask(rk, _mm256_set1_epi8(ESCAPE));
            __m256i sym = _mm256_maskz_shuffle_epi8(keep, tbl, rk);
            __m256i r = _mm256_maskz_loadu_epi8(keep, raw + e + j);
            __m512i bits = join32(sym, r, bf16);
            __m512 w0 = lo_f32(bits, bf16), w1 = hi_f32(bits, bf16);
            for (int b = 0; b < B; b++) {
                a0[b] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + b * k + j), a0[b]);
                a1[b] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + b * k + j + 16), a1[b]);
            }
        }
        for (int b = 0; b < B; b++) acc[b] = _mm512_reduce_add_ps(_mm512_add_ps(a0[b], a1[b]));
    }
#endif
    for (; j < k; j++) {
        uint8_t rk = rank_at(nib, e + j);
        float w = rk == ESCAPE ? 0.0f : to_f32(join(table[rk], raw[e + j], bf16), bf16);
        for (int b = 0; b < B; b++) acc[b] += w * x[b * k + j];
    }
    for (int b = 0; b < B; b++) acc_out[b] = acc[b];
}

static void rows_dots(const uint8_t *table, const uint8_t *nib, const uint8_t *raw, int64_t r0, int64_t r1,
                      int64_t rows, int64_t k, int bf16, const float *x, int B, float *y) {
    float acc[MAXB];
    for (int64_t r = r0; r < r1; r++) {
        switch (B) { /* constant B: the batch loops unroll */
        case 1: row_dots(table, nib, raw, r * k, k, bf16, x, 1, acc); break;
        case 2: row_dots(table, nib, raw, r * k, k, bf16, x, 2, acc); break;
        case 3: row_dots(table, nib, raw, r * k, k, bf16, x, 3, acc); break;
        default: row_dots(table, nib, raw, r * k, k, bf16, x, 4, acc); break;
        }
        for (int b = 0; b < B; b++) y[b * rows + r] = acc[b];
    }
}

/* y [B, rows] = x [B, k] @ W.T for W [rows, k] in fixed4, float32 accumulation, B in 1..4; escapes as a
 * second pass. Returns -1 for an unsupported B. */
int dn_fixed4_matvec(const uint8_t *table, const uint8_t *nibbles, const uint8_t *raw, int64_t rows, int64_t k,
                     const int32_t *esc_index, const uint8_t *esc_symbol, int64_t n_esc, int bf16, const float *x,
                     int B, float *y, int threads) {
    if (B < 1 || B > MAXB) return -1;
    int64_t block = 64;
    int64_t blocks = (rows + block - 1) / block;
    threads = use_threads(threads, rows * k);
    if (threads <= 1 || blocks < 2) {
        rows_dots(table, nibbles, raw, 0, rows, rows, k, bf16, x, B, y);
    } else {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t c = 0; c < blocks; c++) {
            int64_t hi = (c + 1) * block < rows ? (c + 1) * block : rows;
            rows_dots(table, nibbles, raw, c * block, hi, rows, k, bf16, x, B, y);
        }
    }
    for (int64_t j = 0; j < n_esc; j++) {
        int64_t i = esc_index[j], r = i / k, c = i % k;
        float w = to_f32(join(esc_symbol[j], raw[i], bf16), bf16);
        for (int b = 0; b < B; b++) y[b * rows + r] += x[b * k + c] * w;
    }
    return 0;
}

/* bfloat16 weights times bfloat16 inputs (a bf16 model's activations): the weights stay 16-bit and vdpbf16ps
 * multiplies pairs exactly and sums in float32 (it treats subnormals as zero), half the instructions of the
 * float32 path. y [B, rows] float32; escapes as the second pass. Returns -1 for an unsupported B. */
#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
typedef struct {
    __m512i th, tl, i0, i1; /* the symbol's two output-byte tables (bf16), the byte interleaves */
} bf16_tables;

static bf16_tables make_tables(const uint8_t *table) {
    uint8_t th[16], tl[16], idx[2][64];
    for (int r = 0; r < 16; r++) th[r] = table[r] >> 1, tl[r] = (uint8_t)((table[r] & 1) << 7);
    for (int i = 0; i < 32; i++)
        for (int h = 0; h < 2; h++) idx[h][2 * i] = (uint8_t)(32 * h + i), idx[h][2 * i + 1] = (uint8_t)(64 + 32 * h + i);
    bf16_tables t = {_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)th)),
                     _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)tl)), _mm512_loadu_si512(idx[0]),
                     _mm512_loadu_si512(idx[1])};
    return t;
}

static inline __attribute__((always_inline)) void row_dots_bf16(const bf16_tables *T, const uint8_t *table,
                                                                const uint8_t *nib, const uint8_t *raw, int64_t e,
                                                                int64_t k, const uint16_t *x, int B,
                                                                float *acc_out) {
    float acc[MAXB] = {0};
    int64_t j = 0;
    if ((e & 1) == 0) {
        __m512i TH = T->th, TL = T->tl, I0 = T->i0, I1 = T->i1;
        __m512i mh = _mm512_set1_epi8((char)0x80), ml = _mm512_set1_epi8(0x7F);
        __m512 a0[MAXB], a1[MAXB];
        for (int b = 0; b < B; b++) a0[b] = a1[b] = _mm512_setzero_ps();
        for (; j + 64 <= k; j += 64) {
            __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(nib + ((e + j) >> 1))));
            __m512i rk = _mm512_or_si512(_mm512_and_si512(w, _mm512_set1_epi16(0x000F)),
                                         _mm512_slli_epi16(_mm512_and_si512(w, _mm512_set1_epi16(0x00F0)), 4));
            __mmask64 keep = ~_mm512_cmpeq_epi8_mask(rk, _mm512_set1_epi8(ESCAPE)); /* escapes: weight +0 */
            __m512i r = _mm512_maskz_loadu_epi8(keep, raw + e + j);
            __m512i h = _mm512_ternarylogic_epi32(mh, r, _mm512_maskz_shuffle_epi8(keep, TH, rk), 0xEA);
            __m512i l = _mm512_ternarylogic_epi32(ml, r, _mm512_maskz_shuffle_epi8(keep, TL, rk), 0xEA);
            __m512bh w0 = (__m512bh)_mm512_permutex2var_epi8(l, I0, h), w1 = (__m512bh)_mm512_permutex2var_epi8(l, I1, h);
            for (int b = 0; b < B; b++) {
                a0[b] = _mm512_dpbf16_ps(a0[b], w0, (__m512bh)_mm512_loadu_si512(x + b * k + j));
                a1[b] = _mm512_dpbf16_ps(a1[b], w1, (__m512bh)_mm512_loadu_si512(x + b * k + j + 32));
            }
        }
        for (int b = 0; b < B; b++) acc[b] = _mm512_reduce_add_ps(_mm512_add_ps(a0[b], a1[b]));
    }
    for (; j < k; j++) {
        uint8_t rk = rank_at(nib, e + j);
        float w = rk == ESCAPE ? 0.0f : to_f32(join(table[rk], raw[e + j], 1), 1);
        for (int b = 0; b < B; b++) acc[b] += w * to_f32(x[b * k + j], 1);
    }
    for (int b = 0; b < B; b++) acc_out[b] = acc[b];
}

static void rows_dots_bf16(const uint8_t *table, const uint8_t *nib, const uint8_t *raw, int64_t r0, int64_t r1,
                           int64_t rows, int64_t k, const uint16_t *x, int B, float *y) {
    float acc[MAXB];
    bf16_tables T = make_tables(table);
    for (int64_t r = r0; r < r1; r++) {
        switch (B) {
        case 1: row_dots_bf16(&T, table, nib, raw, r * k, k, x, 1, acc); break;
        case 2: row_dots_bf16(&T, table, nib, raw, r * k, k, x, 2, acc); break;
        case 3: row_dots_bf16(&T, table, nib, raw, r * k, k, x, 3, acc); break;
        default: row_dots_bf16(&T, table, nib, raw, r * k, k, x, 4, acc); break;
        }
        for (int b = 0; b < B; b++) y[b * rows + r] = acc[b];
    }
}
#endif

int dn_fixed4_matvec_bf16(const uint8_t *table, const uint8_t *nibbles, const uint8_t *raw, int64_t rows,
                          int64_t k, const int32_t *esc_index, const uint8_t *esc_symbol, int64_t n_esc,
                          const uint16_t *x, int B, float *y, int threads) {
    if (B < 1 || B > MAXB) return -1;
#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
    int64_t block = 64, blocks = (rows + block - 1) / block;
    threads = use_threads(threads, rows * k);
    if (threads <= 1 || blocks < 2) {
        rows_dots_bf16(table, nibbles, raw, 0, rows, rows, k, x, B, y);
    } else {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t c = 0; c < blocks; c++) {
            int64_t hi = (c + 1) * block < rows ? (c + 1) * block : rows;
            rows_dots_bf16(table, nibbles, raw, c * block, hi, rows, k, x, B, y);
        }
    }
    for (int64_t j = 0; j < n_esc; j++) {
        int64_t i = esc_index[j], r = i / k, c = i % k;
        float w = to_f32(join(esc_symbol[j], raw[i], 1), 1);
        for (int b = 0; b < B; b++) y[b * rows + r] += to_f32(x[b * k + c], 1) * w;
    }
    return 0;
#else
    (void)table, (void)nibbles, (void)raw, (void)rows, (void)k, (void)esc_index, (void)esc_symbol, (void)n_esc;
    (void)x, (void)y, (void)threads;
    return -2; /* not built on this CPU: the caller takes the float32 path */
#endif
}

/* Load-time conversion: the stored Huffman code (dn/formats/lossless.py, format 1) of one tensor -> its symbol
 * bytes [n], the same as the numpy reference decoder's; the layout is then built from them
 * (dn.formats.fixed4.from_symbols). lut: uint16 [2**maxlen], entry = symbol | length << 8. Streams are independent:
 * OpenMP over tiles. Returns the number of tiles with a stream that ran past the n_words words (corrupt offsets: the
 * caller raises), else 0. */
int64_t dn_huffman_symbols(const uint32_t *words, int64_t n_words, const uint32_t *offsets, const uint16_t *lut,
                           int64_t n, int lanes, int steps, int maxlen, uint8_t *sym, int threads) {
    if (lanes < 1 || lanes > 4096 || steps < 1 || maxlen < 1 || maxlen > 24) return -1; /* the caller uses numpy */
    int64_t tile = (int64_t)lanes * steps, tiles = (n + tile - 1) / tile, bad = 0;
    uint64_t mask = ((uint64_t)1 << maxlen) - 1;
#pragma omp parallel for num_threads(threads > 1 ? threads : 1) schedule(static) if (threads > 1) reduction(+ : bad)
    for (int64_t t = 0; t < tiles; t++) {
        /* step-major over the tile's lanes: their chains are independent (the CPU overlaps them) and each step
         * writes consecutive symbols */
        uint64_t pos[lanes];
        int64_t base = t * tile, left = n - base, live = 0;
        for (int l = 0; l < lanes; l++) pos[l] = offsets[t * lanes + l];
        for (int64_t s = 0; s < steps && s * lanes < left; s++) {
            int64_t m = left - s * lanes < lanes ? left - s * lanes : lanes; /* lanes holding a symbol at step s */
            uint8_t *out = sym + base + s * lanes;
            for (int l = 0; l < m; l++) {
                uint64_t w = pos[l] >> 5;
                if (w + 1 >= (uint64_t)n_words) {
                    live = 1;
                    break;
                }
                uint64_t window = ((uint64_t)words[w] << 32) | words[w + 1];
                uint16_t e = lut[(window >> (64 - maxlen - (pos[l] & 31))) & mask];
                out[l] = (uint8_t)e;
                pos[l] += e >> 8;
            }
            if (live) break;
        }
        bad += live;
    }
    return bad;
}
