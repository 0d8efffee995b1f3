/* GGUF block weights (dn/formats/gguf_blocks.py) computed on as the file holds them: W [m, k] as uint8 [m, row_bytes],
 * each row a run of blocks. Each block is decoded into int8 codes c (the type's zero folded in) and per sub-block a
 * scale s and, for the types with a min, m: w = s * c (+ m).
 *   dn_gguf_rows:      rows idx -> float32 [n, k], bit for bit gguf_blocks.decode (s * c, then + m: no fused
 *                      multiply-add, hence FP_CONTRACT OFF; gcc's -std=c11, native.FLAGS, does not contract either).
 *   dn_gguf_matmul:    y[T, m] = x[T, k] @ W.T in float32, a block decoded once for up to 8 tokens. AVX-512: the
 *                      block's exact weights in registers (block_w), one fma each per token, for all types but
 *                      Q2_K/Q3_K. Those, and every type in the plain loops (GNU C vectors, SIMD on any target): per
 *                      sub-block g and token t, s_g * (c . x_g) + m_g * sum(x_g), the sums of x taken once per call.
 *                      x is not quantized: float32's x @ decode(W).T up to summation order (the float32 parity gate).
 *   dn_gguf_matmul_q8: the same through x quantized to 8 bits per 32 values and VPDPBUSD integer dots
 *                      (llama.cpp's route; AVX512_VNNI, checked by cpuid): ~2.5x the float kernel, lossy as
 *                      bfloat16 compute is anyway (section "8-bit activations" below).
 * Threads: a pool of this file's own, chunks of rows claimed as they come (section "threads"). Types by their ggml
 * ids. Returns 0, -1 for an unknown type, -2 when out of memory, -3 (integer path) not on this CPU or type. */
#pragma STDC FP_CONTRACT OFF
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

#define INLINE static inline __attribute__((always_inline))
enum { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

INLINE int bw(int t) { return t >= Q2_K ? 256 : 32; }  /* weights per block */
INLINE int sub(int t) { return t == Q2_K || t == Q3_K || t == Q6_K ? 16 : 32; }  /* weights per sub-block */
INLINE int has_min(int t) { return t == Q4_1 || t == Q5_1 || t == Q2_K || t == Q4_K || t == Q5_K; }
static int block_bytes(int t) {
    switch (t) {
    case Q4_0: return 18; case Q4_1: return 20; case Q5_0: return 22; case Q5_1: return 24; case Q8_0: return 34;
    case Q2_K: return 84; case Q3_K: return 110; case Q4_K: return 144; case Q5_K: return 176; case Q6_K: return 210;
    }
    return 0;
}

INLINE float f16(const uint8_t *p) {
    uint16_t h = (uint16_t)(p[0] | p[1] << 8);
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    uint32_t e = (h >> 10) & 31, mant = h & 1023;
    if (e == 0) {  /* zero or subnormal: mant * 2^-24, exact */
        float v = (float)mant * 0x1p-24f;
        return h & 0x8000 ? -v : v;
    }
    union { uint32_t u; float f; } b = {(uint32_t)(h & 0x8000) << 16 | (e == 31 ? 0x7f800000u : (e + 112) << 23) |
                                        mant << 13};
    return b.f;
#endif
}

/* One block -> codes c[bw] (zero folded: c = code - zero), s[sub-blocks], m[sub-blocks] (types with a min). The byte
 * work in GNU C vectors of 16 bytes: SIMD on any target (gcc's vectorizer turns the byte loops, fully unrolled, into
 * scalar code). */
typedef uint8_t v16 __attribute__((vector_size(16)));
INLINE v16 ld(const uint8_t *p) { v16 v; memcpy(&v, p, 16); return v; }
INLINE void st(int8_t *p, v16 v) { memcpy(p, &v, 16); }

INLINE void nibbles(const uint8_t *q, int n, int8_t *lo, int8_t *hi) {
    for (int l = 0; l < n; l += 16) st(lo + l, ld(q + l) & 15), st(hi + l, ld(q + l) >> 4);
}

INLINE void crumbs(const uint8_t *q, int8_t *c) {  /* 32 bytes -> 4 x 32 2-bit fields, c[32j + l] = bits 2j of q[l] */
    for (int j = 0; j < 4; j++)
        for (int l = 0; l < 32; l += 16) st(c + 32 * j + l, (ld(q + l) >> 2 * j) & 3);
}

INLINE void high_bits(const uint8_t *q, int bit, int shift, int width, int8_t *c) {  /* c[l] |= (q[l] >> bit) << shift */
    for (int l = 0; l < 32; l += 16) {
        v16 v;
        memcpy(&v, c + l, 16);
        st(c + l, v | ((ld(q + l) >> bit) & (uint8_t)((1 << width) - 1)) << shift);
    }
}

INLINE void minus(int8_t *c, int n, int zero) {
    for (int l = 0; l < n; l += 16) {
        v16 v;
        memcpy(&v, c + l, 16);
        st(c + l, v - (uint8_t)zero);
    }
}

INLINE v16 bits16(const uint8_t *q) {  /* 16 where bit j of the little-endian uint16 at q is set, else 0 */
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    return (v16)_mm_maskz_set1_epi8((__mmask16)(q[0] | q[1] << 8), 16);
#else
    const v16 bit = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    v16 b = {q[0], q[0], q[0], q[0], q[0], q[0], q[0], q[0], q[1], q[1], q[1], q[1], q[1], q[1], q[1], q[1]};
    return (v16)((b & bit) != 0) & 16;
#endif
}

INLINE void k4_scales(const uint8_t *b, float *s, float *m) {  /* Q4_K/Q5_K: 8 scales and mins of 6 bits */
    uint32_t u[3], sc[2], mn[2];  /* four 6-bit fields a word: bytes 0-3 low bits, 8-11 the rest of 4-7 */
    memcpy(u, b + 4, 12);
    sc[0] = u[0] & 0x3f3f3f3f, sc[1] = (u[2] & 0x0f0f0f0f) | ((u[0] >> 2) & 0x30303030);
    mn[0] = u[1] & 0x3f3f3f3f, mn[1] = ((u[2] >> 4) & 0x0f0f0f0f) | ((u[1] >> 2) & 0x30303030);
#ifdef __AVX512F__
    uint64_t s8, m8;
    memcpy(&s8, sc, 8), memcpy(&m8, mn, 8);
    __m256 d = _mm256_set1_ps(f16(b)), dmin = _mm256_set1_ps(f16(b + 2));
    _mm256_storeu_ps(s, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)s8)))));
    _mm256_storeu_ps(m, _mm256_xor_ps(_mm256_set1_ps(-0.0f),  /* -(dmin * mn), as decode */
                                      _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                                          _mm_cvtsi64_si128((long long)m8))))));
#else
    uint8_t scb[8], mnb[8];
    memcpy(scb, sc, 8), memcpy(mnb, mn, 8);
    float d = f16(b), dmin = f16(b + 2);
    for (int g = 0; g < 8; g++) s[g] = d * (float)scb[g], m[g] = -(dmin * (float)mnb[g]);
#endif
}

INLINE void decode_block(int t, const uint8_t *b, int8_t *restrict c, float *restrict s, float *restrict m) {
    if (t == Q8_0) {
        s[0] = f16(b);
        memcpy(c, b + 2, 32);
    } else if (t <= Q5_1) {  /* Q4_0 Q4_1 Q5_0 Q5_1: d (, m), (qh[4],) qs[16]; weight j low nibble, 16 + j high */
        int o = t == Q4_1 || t == Q5_1 ? 4 : 2, five = t == Q5_0 || t == Q5_1;
        v16 q = ld(b + o + 4 * five), lo = q & 15, hi = q >> 4;
        if (five) lo |= bits16(b + o), hi |= bits16(b + o + 2);
        uint8_t zero = t == Q4_0 ? 8 : t == Q5_0 ? 16 : 0;
        st(c, lo - zero), st(c + 16, hi - zero);  /* in registers until here: one store each */
        s[0] = f16(b);
        if (o == 4) m[0] = f16(b + 2);
    } else if (t == Q2_K || t == Q3_K) {  /* 2-bit codes: weight 128h + 32j + l is bits 2j of qs[32h + l] */
        const uint8_t *qs = b + (t == Q2_K ? 16 : 32);
        crumbs(qs, c), crumbs(qs + 32, c + 128);
        if (t == Q2_K) {
            float d = f16(b + 80), dmin = f16(b + 82);
            for (int g = 0; g < 16; g++) s[g] = d * (float)(b[g] & 15), m[g] = -(dmin * (float)(b[g] >> 4));
        } else {
            for (int i = 0; i < 8; i++) high_bits(b, i, 2, 1, c + 32 * i);  /* hmask: bit i of byte l, weight 32i + l */
            minus(c, 256, 4);
            const uint8_t *sc = b + 96;
            float d = f16(b + 108);
            for (int g = 0; g < 16; g++) {
                int lo = g < 8 ? sc[g] & 15 : sc[g - 8] >> 4, hi = (sc[8 + g % 4] >> 2 * (g / 4)) & 3;
                s[g] = d * ((float)(lo | hi << 4) - 32.0f);
            }
        }
    } else if (t == Q4_K || t == Q5_K) {  /* d, dmin, scales[12], (qh[32],) qs[128]: weight 64h + 32j + l */
        const uint8_t *qs = b + (t == Q4_K ? 16 : 48);
        for (int h = 0; h < 4; h++) nibbles(qs + 32 * h, 32, c + 64 * h, c + 64 * h + 32);
        if (t == Q5_K)
            for (int i = 0; i < 8; i++) high_bits(b + 16, i, 4, 1, c + 32 * i);
        k4_scales(b, s, m);
    } else {  /* Q6_K: ql[128], qh[64], scales[16] int8, d; weight 128h + 64j + l: nibble j of ql[64h + l], its high
               * bits 2i of qh[32h + l'] for weight 128h + 32i + l' */
        for (int h = 0; h < 2; h++) {
            nibbles(b + 64 * h, 64, c + 128 * h, c + 128 * h + 64);
            for (int i = 0; i < 4; i++) high_bits(b + 128 + 32 * h, 2 * i, 4, 2, c + 128 * h + 32 * i);
        }
        minus(c, 256, 32);
        float d = f16(b + 208);
        for (int g = 0; g < 16; g++) s[g] = d * (float)(int8_t)b[192 + g];
    }
}

static int known(int t) { return block_bytes(t) != 0; }

#ifdef __AVX512F__
/* ---- AVX-512: a block's exact weights in registers --------------------------------------------------------------
 * For the types whose codes have 4 or 5 bits (and Q8_0), a block's weights come out as floats equal to decode's:
 * each code indexes a table of its sub-block's 16 (or 32) values s * (q - zero) or s * q + m, built once per
 * sub-block (vpermps reads an index's low 4 bits, vpermt2ps its low 5), so a weight costs a widening and a lookup,
 * and the dot one fma; no scale or min terms after. Q6_K's 6-bit codes are converted (s * (q - 32)); Q2_K and Q3_K
 * go through the codes (below). */
INLINE int fast(int t) { return t <= Q8_0 || t >= Q4_K; }

INLINE __m512 iota(int from) { return _mm512_add_ps(_mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                     _mm512_set1_ps((float)from)); }
INLINE __m512 table(int from, __m512 s, __m512 m, int with_min, float zero) {  /* the values of codes from..from+15 */
    if (with_min) return _mm512_add_ps(_mm512_mul_ps(s, iota(from)), m);
    return _mm512_mul_ps(s, _mm512_sub_ps(iota(from), _mm512_set1_ps(zero)));
}
INLINE __m512 f16x16(const uint8_t *p) {  /* the fp16 at p, in every lane */
    uint16_t h;
    memcpy(&h, p, 2);
    return _mm512_cvtph_ps(_mm256_set1_epi16((short)h));
}
INLINE __m512i bytes16(const uint8_t *p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const void *)p)); }

/* The d (and m) of 32-weight blocks blk.. (16, or those left before nb) of a row, converted together: dm[j] and
 * dm[16 + j] for block blk + j (one gather and one conversion, not two per block). */
INLINE void dm16(int t, const uint8_t *row, int64_t blk, int64_t nb, float *dm) {
    const int bb = block_bytes(t);
    __mmask16 live = nb - blk >= 16 ? 0xFFFF : (__mmask16)((1u << (nb - blk)) - 1);
    __m512i at = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                    _mm512_set1_epi32(bb));
    __m512i g = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, at, row + blk * bb, 1);
    _mm512_storeu_ps(dm, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(g)));
    _mm512_storeu_ps(dm + 16, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(g, 16))));
}

/* Block b -> its bw/16 vectors of weights in w. dm: a 32-weight block's d (and m) as floats (dm16), else unread. */
INLINE void block_w(int t, const uint8_t *b, const float *dm, __m512 *w) {
    if (t == Q8_0) {
        __m512 d = _mm512_set1_ps(dm[0]);
        for (int i = 0; i < 2; i++)
            w[i] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const void *)(b + 2 + 16 * i)))));
    } else if (t <= Q5_1) {
        int o = t == Q4_1 || t == Q5_1 ? 4 : 2, five = t == Q5_0 || t == Q5_1, mins = o == 4;
        __m512 d = _mm512_set1_ps(dm[0]), m = _mm512_set1_ps(dm[16]);
        float zero = t == Q4_0 ? 8 : 16;
        __m512i v = bytes16(b + o + 4 * five), lo = v, hi = _mm512_srli_epi32(v, 4);
        __m512 ta = table(0, d, m, mins, zero);
        if (!five) {
            w[0] = _mm512_permutexvar_ps(lo, ta), w[1] = _mm512_permutexvar_ps(hi, ta);
        } else {
            uint32_t qh;
            memcpy(&qh, b + o, 4);
            __m512 tb = table(16, d, m, mins, zero);
            __m512i sixteen = _mm512_set1_epi32(16), low4 = _mm512_set1_epi32(15);
            lo = _mm512_and_si512(v, low4);
            lo = _mm512_mask_or_epi32(lo, (__mmask16)qh, lo, sixteen);
            hi = _mm512_mask_or_epi32(hi, (__mmask16)(qh >> 16), hi, sixteen);
            w[0] = _mm512_permutex2var_ps(ta, lo, tb), w[1] = _mm512_permutex2var_ps(ta, hi, tb);
        }
    } else if (t == Q6_K) {  /* weight 128h + 32i + l: nibble i / 2 of ql[64h + 32 (i % 2) + l], bits 2i of qh[32h + l] */
        float s[16];
        __m512 d = f16x16(b + 208);
        _mm512_storeu_ps(s, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const void *)(b + 192))))));
        __m512i low4 = _mm512_set1_epi32(15), three = _mm512_set1_epi32(3), zero = _mm512_set1_epi32(32);
        for (int h = 0; h < 2; h++)
            for (int e = 0; e < 2; e++) {
                __m512i qh = bytes16(b + 128 + 32 * h + 16 * e);
                for (int i = 0; i < 4; i++) {
                    __m512i q = bytes16(b + 64 * h + 32 * (i % 2) + 16 * e);
                    q = i < 2 ? _mm512_and_si512(q, low4) : _mm512_srli_epi32(q, 4);
                    q = _mm512_or_si512(q, _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(qh, 2 * i), three), 4));
                    int g = 8 * h + 2 * i + e;
                    w[g] = _mm512_mul_ps(_mm512_set1_ps(s[g]), _mm512_cvtepi32_ps(_mm512_sub_epi32(q, zero)));
                }
            }
    } else {  /* Q4_K, Q5_K: sub-block 2h the low nibbles of qs[32h..], 2h + 1 the high ones */
        float s[8], m[8];
        k4_scales(b, s, m);
        const uint8_t *qs = b + (t == Q4_K ? 16 : 48);
        __m512i qh[2] = {bytes16(b + 16), bytes16(b + 32)}, one = _mm512_set1_epi32(1), low4 = _mm512_set1_epi32(15);
        for (int h = 0; h < 4; h++)
            for (int j = 0; j < 2; j++) {
                int g = 2 * h + j;
                __m512 sg = _mm512_set1_ps(s[g]), mg = _mm512_set1_ps(m[g]), ta = table(0, sg, mg, 1, 0);
                for (int i = 0; i < 2; i++) {
                    __m512i v = bytes16(qs + 32 * h + 16 * i);
                    v = j ? _mm512_srli_epi32(v, 4) : _mm512_and_si512(v, low4);
                    if (t == Q4_K) {
                        w[4 * h + 2 * j + i] = _mm512_permutexvar_ps(v, ta);
                    } else {  /* the fifth bit: bit g of qh[l] */
                        v = _mm512_or_si512(v, _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(qh[i], g), one), 4));
                        w[4 * h + 2 * j + i] = _mm512_permutex2var_ps(ta, v, table(16, sg, mg, 1, 0));
                    }
                }
            }
    }
}
#endif


/* ---- threads: a pool of its own, not OpenMP's ------------------------------------------------------------------
 * OpenMP's team ends at a barrier that waits for every thread, and its idle threads spin: on shared cores (2 here,
 * 5 processes) Qwen2.5-1.5B's MLP matmuls ran 7x slower at 2 threads than at one. Here a run is cut into chunks
 * that threads claim as they come (one 64-bit word: the run's generation, the next chunk), the caller among them;
 * the caller waits only for chunks already claimed, and idle workers sleep on a condition variable. A worker woken
 * late finds the generation moved on and goes back to sleep. One run at a time: a second caller runs alone. */
typedef void (*chunk_fn)(const void *job, int64_t c);
enum { MAX_WORKERS = 63 };
static struct {
    pthread_mutex_t mu;
    pthread_cond_t wake;
    uint32_t gen;  /* the run: gen, fn, job, nc and want under mu */
    int workers, want;
    chunk_fn fn;
    const void *job;
    int64_t nc;
    _Atomic uint64_t claim;  /* gen << 32 | the next chunk */
    _Atomic int64_t done;
    atomic_flag busy;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, NULL, NULL, 0, 0, 0, ATOMIC_FLAG_INIT};

static void work(uint32_t g, chunk_fn fn, const void *job, int64_t nc) {
    uint64_t s = atomic_load(&pool.claim);
    while ((uint32_t)(s >> 32) == g && (int64_t)(s & 0xffffffffu) < nc)
        if (atomic_compare_exchange_weak(&pool.claim, &s, s + 1)) {
            fn(job, (int64_t)(s & 0xffffffffu));
            atomic_fetch_add(&pool.done, 1);
            s = atomic_load(&pool.claim);
        }
}

static void *worker(void *arg) {
    const int id = (int)(intptr_t)arg;
    pthread_mutex_lock(&pool.mu);
    for (uint32_t seen = pool.gen;;) {
        while (pool.gen == seen) pthread_cond_wait(&pool.wake, &pool.mu);
        seen = pool.gen;
        if (id >= pool.want) continue;
        chunk_fn fn = pool.fn;
        const void *job = pool.job;
        int64_t nc = pool.nc;
        pthread_mutex_unlock(&pool.mu);
        work(seen, fn, job, nc);
        pthread_mutex_lock(&pool.mu);
    }
    return NULL;
}

static void forked(void) {  /* a fork's child has none of the workers, and may hold a copy of a taken lock */
    pthread_mutex_init(&pool.mu, NULL), pthread_cond_init(&pool.wake, NULL);
    pool.workers = 0;
    atomic_flag_clear(&pool.busy);
}
static void at_fork(void) { pthread_atfork(NULL, NULL, forked); }

static void run(chunk_fn fn, const void *job, int64_t nc, int threads) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, at_fork);
    if (threads > nc) threads = (int)nc;
    if (threads > MAX_WORKERS + 1) threads = MAX_WORKERS + 1;
    if (threads <= 1 || atomic_flag_test_and_set(&pool.busy)) {
        for (int64_t c = 0; c < nc; c++) fn(job, c);
        return;
    }
    pthread_mutex_lock(&pool.mu);
    for (pthread_t th; pool.workers < threads - 1; pool.workers++)
        if (pthread_create(&th, NULL, worker, (void *)(intptr_t)pool.workers) || pthread_detach(th)) break;
    const uint32_t g = ++pool.gen;
    pool.fn = fn, pool.job = job, pool.nc = nc, pool.want = threads - 1;
    atomic_store(&pool.done, 0);
    atomic_store(&pool.claim, (uint64_t)g << 32);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.mu);
    work(g, fn, job, nc);
    for (int spin = 0; atomic_load(&pool.done) < nc; spin++)  /* chunks a worker still holds */
        if (spin > 1000) sched_yield();
    atomic_flag_clear(&pool.busy);
}

/* Rows a chunk holds: 32 KiB of blocks (an L1's worth, kept over the tokens of a matmul). */
static int64_t chunk_rows(int64_t m, int64_t row_bytes) {
    int64_t r = (32 << 10) / (row_bytes ? row_bytes : 1);
    return r < 1 ? 1 : r > m ? (m ? m : 1) : r;
}

/* ---- rows ------------------------------------------------------------------------------------------------ */

INLINE void row_t(int t, const uint8_t *w, int64_t k, float *out) {
    int8_t c[256];
    float s[16], m[16];
    const int B = bw(t), S = sub(t), bb = block_bytes(t);
#ifdef __AVX512F__
    if (fast(t)) {
        __m512 wv[16];
        float dm[32];
        for (int64_t blk = 0; blk < k / B; blk++) {
            if (B == 32 && blk % 16 == 0) dm16(t, w, blk, k / B, dm);
            block_w(t, w + blk * bb, dm + blk % 16, wv);
            for (int i = 0; i < B / 16; i++) _mm512_storeu_ps(out + blk * B + 16 * i, wv[i]);
        }
        return;
    }
#endif
    for (int64_t blk = 0; blk < k / B; blk++) {
        decode_block(t, w + blk * bb, c, s, m);
        float *o = out + blk * B;
#pragma GCC unroll 1
        for (int i = 0; i < B; i++) o[i] = (float)c[i];
        for (int g = 0; g < B / S; g++)
            for (int i = 0; i < S; i++) {
                float v = s[g] * o[g * S + i];
                o[g * S + i] = has_min(t) ? v + m[g] : v;  /* two roundings, as numpy: no fma */
            }
    }
}

#define EACH_TYPE(F, ...) \
    switch (t) { \
    case Q4_0: F(Q4_0, __VA_ARGS__); break; case Q4_1: F(Q4_1, __VA_ARGS__); break; \
    case Q5_0: F(Q5_0, __VA_ARGS__); break; case Q5_1: F(Q5_1, __VA_ARGS__); break; \
    case Q8_0: F(Q8_0, __VA_ARGS__); break; case Q2_K: F(Q2_K, __VA_ARGS__); break; \
    case Q3_K: F(Q3_K, __VA_ARGS__); break; case Q4_K: F(Q4_K, __VA_ARGS__); break; \
    case Q5_K: F(Q5_K, __VA_ARGS__); break; case Q6_K: F(Q6_K, __VA_ARGS__); break; \
    }

typedef struct { int t; const uint8_t *w; int64_t k, rb, n, rows; const int64_t *idx; float *out; } rows_job;

static void rows_chunk(const void *job, int64_t c) {
    const rows_job *j = job;
    const int t = j->t;
    for (int64_t r = c * j->rows; r < j->n && r < (c + 1) * j->rows; r++) {
        const uint8_t *row = j->w + (j->idx ? j->idx[r] : r) * j->rb;
#define ROW(T, _) row_t(T, row, j->k, j->out + r * j->k)
        EACH_TYPE(ROW, 0)
    }
}

/* idx NULL: the n rows from w on. */
int dn_gguf_rows(int t, const uint8_t *w, int64_t k, const int64_t *idx, int64_t n, float *out, int threads) {
    if (!known(t)) return -1;
    const rows_job j = {t, w, k, k / bw(t) * block_bytes(t), n, 16, idx, out};
    run(rows_chunk, &j, (n + j.rows - 1) / j.rows, threads);
    return 0;
}

/* ---- matmul ---------------------------------------------------------------------------------------------- */

/* acc += s * (c . x) over one sub-block of S weights (16 or 32), 16 lanes: AVX-512 from the int8 codes c, else from
 * fc, the block's codes as floats (gcc 12 converts int8 vectors to float one lane at a time, so the plain path
 * converts a whole block in one loop, which it vectorizes). */
#ifdef __AVX512F__
typedef __m512 acc_t;
INLINE void dot_sub(int S, const int8_t *c, const float *fc, const float *x, float s, acc_t *acc) {
    (void)fc;
    __m512 p = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const void *)c))),
                             _mm512_loadu_ps(x));
    if (S == 32)
        p = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const void *)(c + 16)))),
                            _mm512_loadu_ps(x + 16), p);
    *acc = _mm512_fmadd_ps(_mm512_set1_ps(s), p, *acc);
}
#else
typedef float f32x8 __attribute__((vector_size(32)));  /* 8 lanes: gcc broadcasts a scalar into 16 through memory */
typedef struct { f32x8 h[2]; } acc_t;
INLINE f32x8 ld8(const float *x) { f32x8 v; memcpy(&v, x, 32); return v; }
INLINE void dot_sub(int S, const int8_t *c, const float *fc, const float *x, float s, acc_t *acc) {
    (void)c;
    for (int h = 0; h < 2; h++) {
        f32x8 p = ld8(fc + 8 * h) * ld8(x + 8 * h);
        if (S == 32) p += ld8(fc + 16 + 8 * h) * ld8(x + 16 + 8 * h);
        acc->h[h] += s * p;
    }
}
#endif

/* Rows [r0, r1) of y for tokens [t0, t0 + NT), NT a constant (1, 2, 4, 8) and every index a constant, so the
 * accumulators stay in registers: two per token, sub-blocks alternating (an add's latency, not the port, bounds one
 * chain), and the min terms in 16 lanes (sub-block g in lane g). xs: sums of x per sub-block, [T, k / S]. */
INLINE void matmul_rows(int t, int NT, const uint8_t *w, int64_t r0, int64_t r1, int64_t m, int64_t k, const float *x,
                        const float *xs, int64_t t0, float *y) {
    int8_t c[256];
    float s[16], mn[16] = {0}, fc[256];
    const int B = bw(t), S = sub(t), G = B / S, bb = block_bytes(t);
    const int64_t nb = k / B, rb = nb * bb, gs = k / S;
    for (int64_t r = r0; r < r1; r++) {
        acc_t acc[8][2];
        float accm[8][16] = {{0}};
        memset(acc, 0, sizeof acc);
        const uint8_t *row = w + r * rb;
        for (int64_t blk = 0; blk < nb; blk++) {
            if (blk + 4 < nb) __builtin_prefetch(row + (blk + 4) * bb);
            decode_block(t, row + blk * bb, c, s, mn);
#ifndef __AVX512F__
#pragma GCC unroll 1  /* a loop, for the vectorizer: fully unrolled, gcc converts lane by lane */
            for (int i = 0; i < B; i++) fc[i] = (float)c[i];
#endif
            for (int u = 0; u < NT; u++) {
                const float *xb = x + (t0 + u) * k + blk * B;
                for (int g = 0; g < G; g++) dot_sub(S, c + g * S, fc + g * S, xb + g * S, s[g], &acc[u][g & 1]);
                if (has_min(t)) {
                    const float *xg = xs + (t0 + u) * gs + blk * G;
                    for (int g = 0; g < G; g++) accm[u][g] += mn[g] * xg[g];
                }
            }
        }
        for (int u = 0; u < NT; u++) {
            float v = 0, lanes[2][16];
            memcpy(lanes, acc[u], sizeof lanes);
            for (int l = 0; l < 16; l++) v += lanes[0][l] + lanes[1][l] + accm[u][l];
            y[(t0 + u) * m + r] = v;
        }
    }
}

#ifdef __AVX512F__
/* matmul_rows for the fast types: the block's weights (block_w) dotted with each token's x. Blocks in pairs, the
 * second into its own accumulators where a block is two vectors (an fma's latency would bound two chains); every
 * index a constant, so the accumulators stay in registers. */
INLINE void w_dot(int t, int NT, const uint8_t *b, const float *dm, const float *xb, int64_t k, int a0,
                  __m512 (*acc)[4]) {
    __m512 wv[16];
    const int V = bw(t) / 16;
    block_w(t, b, dm, wv);
    for (int u = 0; u < NT; u++)
        for (int i = 0; i < V; i++)
            acc[u][a0 + (i & 1)] = _mm512_fmadd_ps(wv[i], _mm512_loadu_ps(xb + u * k + 16 * i), acc[u][a0 + (i & 1)]);
}

INLINE void matmul_rows_w(int t, int NT, const uint8_t *w, int64_t r0, int64_t r1, int64_t m, int64_t k,
                          const float *x, int64_t t0, float *y) {
    const int B = bw(t), bb = block_bytes(t), pair = B == 32 && NT <= 2 ? 2 : 0;
    const int64_t nb = k / B, rb = nb * bb;
    float dm[32];
    for (int64_t r = r0; r < r1; r++) {
        __m512 acc[8][4];
        for (int u = 0; u < NT; u++)
            for (int i = 0; i < 4; i++) acc[u][i] = _mm512_setzero_ps();
        const uint8_t *row = w + r * rb;
        const float *xr = x + t0 * k;
        for (int64_t b0 = 0; b0 < nb; b0 += 16) {
            const int n = nb - b0 < 16 ? (int)(nb - b0) : 16;
            if (B == 32) dm16(t, row, b0, nb, dm);
            int j = 0;
            for (; j + 2 <= n; j += 2) {
                const int64_t blk = b0 + j;
                __builtin_prefetch(row + (blk + 8) * bb);
                w_dot(t, NT, row + blk * bb, dm + j, xr + blk * B, k, 0, acc);
                w_dot(t, NT, row + (blk + 1) * bb, dm + j + 1, xr + (blk + 1) * B, k, pair, acc);
            }
            if (j < n) w_dot(t, NT, row + (b0 + j) * bb, dm + j, xr + (b0 + j) * B, k, 0, acc);
        }
        for (int u = 0; u < NT; u++) {
            __m512 a = _mm512_add_ps(_mm512_add_ps(acc[u][0], acc[u][1]), _mm512_add_ps(acc[u][2], acc[u][3]));
            y[(t0 + u) * m + r] = _mm512_reduce_add_ps(a);
        }
    }
}
#define ROWS_OF(TY, NT, ...) \
    if (fast(TY)) matmul_rows_w(TY, NT, w, r0, r1, m, k, x, t0, y); else matmul_rows(TY, NT, __VA_ARGS__)
#else
#define ROWS_OF(TY, NT, ...) matmul_rows(TY, NT, __VA_ARGS__)
#endif

#define NTS(TY, ...) \
    switch (nt) { \
    case 1: ROWS_OF(TY, 1, __VA_ARGS__); break; case 2: ROWS_OF(TY, 2, __VA_ARGS__); break; \
    case 4: ROWS_OF(TY, 4, __VA_ARGS__); break; default: ROWS_OF(TY, 8, __VA_ARGS__); break; \
    }

static void matmul_part(int t, int nt, const uint8_t *w, int64_t r0, int64_t r1, int64_t m, int64_t k, const float *x,
                        const float *xs, int64_t t0, float *y) {
    EACH_TYPE(NTS, w, r0, r1, m, k, x, xs, t0, y)
}

typedef struct { int t; const uint8_t *w; int64_t m, k; const float *x, *xs; int64_t T; float *y; int64_t rows; } matmul_job;

static void matmul_chunk(const void *job, int64_t c) {
    const matmul_job *j = job;
    const int64_t r0 = c * j->rows, r1 = r0 + j->rows < j->m ? r0 + j->rows : j->m;
    for (int64_t t0 = 0, nt; t0 < j->T; t0 += nt) {  /* a chunk's rows stay in cache over the tokens */
        nt = j->T - t0 >= 8 ? 8 : j->T - t0 >= 4 ? 4 : j->T - t0 >= 2 ? 2 : 1;
        matmul_part(j->t, (int)nt, j->w, r0, r1, j->m, j->k, j->x, j->xs, t0, j->y);
    }
}

int dn_gguf_matmul(int t, const uint8_t *w, int64_t m, int64_t k, const float *x, int64_t T, float *y, int threads) {
    if (!known(t)) return -1;
    const int S = sub(t);
    const int64_t gs = k / S;
    float *xs = NULL;
#ifdef __AVX512F__
    if (has_min(t) && !fast(t)) {
#else
    if (has_min(t)) {
#endif
        if (!(xs = malloc(sizeof(float) * (size_t)(T * gs + 1)))) return -2;
        for (int64_t i = 0; i < T * gs; i++) {
            float v = 0;
            for (int l = 0; l < S; l++) v += x[i * S + l];
            xs[i] = v;
        }
    }
    const matmul_job j = {t, w, m, k, x, xs, T, y, chunk_rows(m, k / bw(t) * block_bytes(t))};
    run(matmul_chunk, &j, (m + j.rows - 1) / j.rows, threads);
    free(xs);
    return 0;
}

int dn_gguf_isa(void) {
#ifdef __AVX512F__
    return 1;
#else
    return 0;
#endif
}

/* ---- 8-bit activations, integer dots (llama.cpp's route for decode; AVX512_VNNI) ------------------------------
 * x is quantized once a call, per 32 values as llama.cpp's Q8_0: dx = amax / 127, q = rint(x * (127 / amax)) in
 * int8 (0 where amax is 0). A block's codes as unsigned bytes c (0..63; Q8_0's int8 + 128) dot q by VPDPBUSD into
 * int32 lanes of 4 weights, each lane started at -zero * (its 4 q's sum): a lane holds sum (c - zero) q exactly. A
 * sub-block's lanes then scale by s * dx in float; the types with a min add m * (dx * sum q) per sub-block. So y is
 * x's 8-bit copy (q * dx) dotted with decode(W), up to float rounding. Built where the compiler targets VNNI (-march=
 * native: this CPU), run where cpuid says so (dn_gguf_q8_types); elsewhere callers take the float path.
 * Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q4_K Q5_K Q6_K; Q2_K and Q3_K take the float path. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define Q8_TYPES (1u << Q4_0 | 1u << Q4_1 | 1u << Q5_0 | 1u << Q5_1 | 1u << Q8_0 | 1u << Q4_K | 1u << Q5_K | 1u << Q6_K)
INLINE int q8_zero(int t) { return t == Q4_0 ? 8 : t == Q5_0 ? 16 : t == Q8_0 ? 128 : t == Q6_K ? 32 : 0; }

typedef struct { const int8_t *q; const float *dx, *xs; const int32_t *z; } xq_t;  /* one token's 8-bit x */

INLINE __m512 load_x16(const void *x, int bf16, int64_t i) {  /* 16 values of x (float32 or bfloat16) as floats */
    if (!bf16) return _mm512_loadu_ps((const float *)x + i);
    __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)((const uint16_t *)x + i)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
}

/* x [k] -> q [kp], dx [kp / 32], and per type t's needs z [kp / 4] = -zero * (sum of each 4 q) and xs [kp / 32] = dx *
 * (sum of 32 q); the buffers zero from k to kp (kp: k up to 512, so a 16-block step reads zeros past a row). Q4_K and
 * Q5_K (k4): within each 256, q's 32-value chunks in the order 0 2 1 3 4 6 5 7 (the blocks' 64 bytes of nibbles
 * unpack so), and dx, xs interleaved in dx [kp / 16]. t 0: plain. */
static void quantize_x(const void *x, int bf16, int64_t k, int t, int8_t *q, float *dx, int32_t *z, float *xs) {
    const __m512 sign = _mm512_set1_ps(-0.0f);
    const int zero = q8_zero(t), k4 = t == Q4_K || t == Q5_K, mins = has_min(t);
    for (int64_t b = 0; b < k / 32; b++) {
        __m512 v0 = load_x16(x, bf16, 32 * b), v1 = load_x16(x, bf16, 32 * b + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, v0), _mm512_andnot_ps(sign, v1)));
        float id = amax != 0.0f ? 127.0f / amax : 0.0f, d = amax / 127.0f;
        __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(id)));  /* nearest, ties to even */
        __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(id)));
        __m256i c = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm512_cvtepi32_epi8(i0)), _mm512_cvtepi32_epi8(i1), 1);
        const int64_t at = k4 ? (b & ~3) | (b & 1) << 1 | (b >> 1 & 1) : b;
        _mm256_storeu_si256((void *)(q + 32 * at), c);
        float sum = mins ? d * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1)) : 0.0f;
        if (k4)
            dx[2 * b] = d, dx[2 * b + 1] = sum;
        else
            dx[b] = d, xs[b] = sum;
        if (zero) {  /* sums of 4 q: VPDPBUSD of ones and q */
            __m256i s4 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(1), c);
            _mm256_storeu_si256((void *)(z + 8 * b), _mm256_mullo_epi32(s4, _mm256_set1_epi32(-zero)));
        }
    }
}

INLINE __m512 dot_q(__m512i c, __m512i init, const int8_t *q, __m512 s, __m512 acc) {
    __m512i p = _mm512_dpbusd_epi32(init, c, _mm512_loadu_si512((const void *)q));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), s, acc);
}
INLINE __m512i z_at(const xq_t *x, int zero, int64_t i) {  /* the lanes' start for weights i..i+63 */
    return zero ? _mm512_loadu_si512((const void *)(x->z + i / 4)) : _mm512_setzero_si512();
}
INLINE __m512i runs(int a, int n) {  /* lane l: a + l / n (the index of lane l's sub-block, n lanes each) */
    return _mm512_add_epi32(_mm512_srli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              n == 8 ? 3 : n == 4 ? 2 : 1),
                            _mm512_set1_epi32(a));
}

/* Two 32-weight blocks' codes (b1: the second, or b0 again past a row's end, then dotted with x's zero padding), in
 * x's order: Q8_0's bytes + 128; Q4_x/Q5_x [lo nibbles, hi nibbles] of each, the fifth bits added (as 16). */
INLINE __m512i codes32(int t, const uint8_t *b0, const uint8_t *b1) {
    if (t == Q8_0)
        return _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const void *)(b0 + 2))),
                                                   _mm256_loadu_si256((const void *)(b1 + 2)), 1), _mm512_set1_epi8(-128));
    const int o = t == Q4_1 || t == Q5_1 ? 4 : 2, five = t == Q5_0 || t == Q5_1;
    __m512i v = _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_broadcastsi128_si256(_mm_loadu_si128((const void *)(b0 + o + 4 * five)))),
        _mm256_broadcastsi128_si256(_mm_loadu_si128((const void *)(b1 + o + 4 * five))), 1);
    const long long s4 = 0x0004000400040004LL;  /* 16-bit lanes shifted by 4 in the hi nibbles' quarters */
    v = _mm512_and_si512(_mm512_srlv_epi16(v, _mm512_set_epi64(s4, s4, 0, 0, s4, s4, 0, 0)), _mm512_set1_epi8(15));
    if (five) {
        uint32_t h0, h1;
        memcpy(&h0, b0 + o, 4), memcpy(&h1, b1 + o, 4);
        v = _mm512_mask_add_epi8(v, (__mmask64)h0 | (__mmask64)h1 << 32, v, _mm512_set1_epi8(16));
    }
    return v;
}

/* Where y goes: float32, or bfloat16 (rounded to nearest even, as torch) where bf16; plus bias [m] of y's dtype. */
typedef struct { void *y; const void *bias; int bf16; } out_t;
INLINE void put(const out_t *o, int64_t i, int64_t r, float v) {
    if (!o->bf16) {
        ((float *)o->y)[i] = o->bias ? v + ((const float *)o->bias)[r] : v;
        return;
    }
    uint32_t u = o->bias ? (uint32_t)((const uint16_t *)o->bias)[r] << 16 : 0;
    float add;
    memcpy(&add, &u, 4);
    v += add;  /* + 0.0f where there is no bias: v unchanged (a -0 sum comes out +0) */
    memcpy(&u, &v, 4);
    ((uint16_t *)o->y)[i] = (uint16_t)(isnan(v) ? u >> 16 | 64 : (u + 0x7FFF + (u >> 16 & 1)) >> 16);
}

/* Blocks read 2 KiB ahead: from DRAM (a model's weights, streamed once a token) one thread reads ~1.7x faster so
 * (benchmarks/bench_gguf.py, the lm_head shape); prefetches past the end are harmless. */
#define Q8_PREFETCH(b, n) for (int l = 0; l < (n); l += 64) _mm_prefetch((const char *)(b) + 2048 + l, _MM_HINT_T0)
#define Q8_INIT(NT) /* arrays of 4 (NT at most), not [NT]: a variable-length array would live in memory */ \
    __m512 acc[4][2], accm[4]; \
    for (int u = 0; u < NT; u++) acc[u][0] = acc[u][1] = accm[u] = _mm512_setzero_ps();
#define Q8_PUT(NT) \
    for (int u = 0; u < NT; u++) \
        put(o, (t0 + u) * m + r, r, _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[u][0], acc[u][1]), accm[u])));

/* Rows [r0, r1) of y for tokens t0.. t0 + NT (a constant, so the accumulators stay in registers). 32-weight blocks:
 * two to a vector, their d (and m) converted 16 blocks at a time (dm16). */
INLINE void q8_rows32(int t, int NT, const uint8_t *w, int64_t r0, int64_t r1, int64_t m, int64_t k, const xq_t *x,
                      int64_t t0, const out_t *o) {
    const int bb = block_bytes(t), zero = q8_zero(t), mins = has_min(t);
    const int64_t nb = k / 32, rb = nb * bb;
    float dm[32];
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = w + r * rb;
        Q8_INIT(NT)
        for (int64_t b0 = 0; b0 < nb; b0 += 16) {
            const int n = nb - b0 < 16 ? (int)(nb - b0) : 16;
            dm16(t, row, b0, nb, dm);
            __m512 sd[4], d = _mm512_loadu_ps(dm);
            for (int u = 0; u < NT; u++) {
                sd[u] = _mm512_mul_ps(d, _mm512_loadu_ps(x[u].dx + b0));
                if (mins) accm[u] = _mm512_fmadd_ps(_mm512_loadu_ps(dm + 16), _mm512_loadu_ps(x[u].xs + b0), accm[u]);
            }
#define PAIR(h) \
    do { \
        const int jj = j + 2 * h; \
        const uint8_t *b = row + (b0 + jj) * bb; \
        Q8_PREFETCH(b, 2 * bb); \
        __m512i c = codes32(t, b, jj + 1 < n ? b + bb : b); \
        const int64_t i = (b0 + jj) * 32; \
        for (int u = 0; u < NT; u++) \
            acc[u][h] = dot_q(c, z_at(x + u, zero, i), x[u].q + i, _mm512_permutexvar_ps(runs(jj, 8), sd[u]), \
                              acc[u][h]); \
    } while (0)
            for (int j = 0; j < n; j += 4) {  /* two pairs a turn, each into accumulators known when compiled */
                PAIR(0);
                if (j + 2 < n) PAIR(1);
            }
#undef PAIR
        }
        Q8_PUT(NT)
    }
}

/* Q4_K, Q5_K: 64 bytes of qs hold sub-blocks 4i, 4i + 2 in their low nibbles and 4i + 1, 4i + 3 in their high ones
 * (x's chunks ordered to match). Scales and mins: 16 lanes s0 m0 s1 m1 .. (6-bit, from the 12 bytes as k4_scales)
 * times d dmin d dmin .., times x's dx xs dx xs ..: the even lanes scale sub-blocks, the odd ones are the min terms,
 * summed apart and subtracted at the end (m = -dmin * mn). */
INLINE __m512 k4_w(const uint8_t *b) {
    uint32_t u[3], sc[2], mn[2], dd;
    memcpy(u, b + 4, 12), memcpy(&dd, b, 4);
    sc[0] = u[0] & 0x3f3f3f3f, sc[1] = (u[2] & 0x0f0f0f0f) | ((u[0] >> 2) & 0x30303030);
    mn[0] = u[1] & 0x3f3f3f3f, mn[1] = ((u[2] >> 4) & 0x0f0f0f0f) | ((u[1] >> 2) & 0x30303030);
    uint64_t s8, m8;
    memcpy(&s8, sc, 8), memcpy(&m8, mn, 8);
    __m128i sm = _mm_unpacklo_epi8(_mm_cvtsi64_si128((long long)s8), _mm_cvtsi64_si128((long long)m8));
    return _mm512_mul_ps(_mm512_cvtph_ps(_mm256_set1_epi32((int)dd)), _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(sm)));
}

INLINE void q8_rows_k4(int t, int NT, const uint8_t *w, int64_t r0, int64_t r1, int64_t m, int64_t k, const xq_t *x,
                       int64_t t0, const out_t *o) {
    const int bb = block_bytes(t);
    const int64_t nb = k / 256, rb = nb * bb;
    const __m512i low4 = _mm512_set1_epi8(15);
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = w + r * rb;
        Q8_INIT(NT)
        for (int64_t blk = 0; blk < nb; blk++) {
            const uint8_t *b = row + blk * bb, *qs = b + (t == Q4_K ? 16 : 48);
            Q8_PREFETCH(b, bb);
            __m512 sm = k4_w(b), ss[4];
            for (int u = 0; u < NT; u++) {
                ss[u] = _mm512_mul_ps(sm, _mm512_loadu_ps(x[u].dx + 16 * blk));
                accm[u] = _mm512_mask_sub_ps(accm[u], 0xAAAA, accm[u], ss[u]);
            }
            __m512i qh = t == Q5_K ? _mm512_broadcast_i64x4(_mm256_loadu_si256((const void *)(b + 16))) : low4;
            for (int i = 0; i < 2; i++) {
                __m512i v = _mm512_loadu_si512((const void *)(qs + 64 * i));
                for (int j = 0; j < 2; j++) {  /* j 0: sub-blocks 4i, 4i + 2; j 1: 4i + 1, 4i + 3 */
                    __m512i c = _mm512_and_si512(j ? _mm512_srli_epi16(v, 4) : v, low4);
                    const int g = 4 * i + j;
                    if (t == Q5_K) {  /* the fifth bit of sub-block g: bit g of qh[l] */
                        __m512i bit = _mm512_inserti64x4(_mm512_set1_epi8((char)(1 << g)),
                                                         _mm256_set1_epi8((char)(1 << (g + 2))), 1);
                        c = _mm512_mask_add_epi8(c, _mm512_test_epi8_mask(qh, bit), c, _mm512_set1_epi8(16));
                    }
                    const __m512i at = _mm512_add_epi32(_mm512_slli_epi32(runs(0, 8), 2), _mm512_set1_epi32(2 * g));
                    const int64_t o = 256 * blk + 128 * i + 64 * j;
                    for (int u = 0; u < NT; u++)
                        acc[u][j] = dot_q(c, _mm512_setzero_si512(), x[u].q + o, _mm512_permutexvar_ps(at, ss[u]),
                                          acc[u][j]);
                }
            }
        }
        Q8_PUT(NT)
    }
}

/* Q6_K: weights 128h + 64j + l, nibble j of ql[64h + l]; high bits 2i of qh[32h + l'] for 128h + 32i + l'. A vector
 * holds 64 weights, four 16-weight sub-blocks. */
INLINE void q8_rows_q6k(int NT, const uint8_t *w, int64_t r0, int64_t r1, int64_t m, int64_t k, const xq_t *x,
                        int64_t t0, const out_t *o) {
    const int64_t nb = k / 256, rb = nb * 210;
    const long long s2 = 0x0002000200020002LL, s4 = 0x0004000400040004LL;
    const __m512i up = _mm512_set_epi64(s2, s2, s2, s2, s4, s4, s4, s4), down = _mm512_set_epi64(s2, s2, s2, s2, 0, 0, 0, 0);
    const __m512i low4 = _mm512_set1_epi8(15), two = _mm512_set1_epi8(0x30);
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = w + r * rb;
        Q8_INIT(NT)
        for (int64_t blk = 0; blk < nb; blk++) {
            const uint8_t *b = row + blk * 210;
            Q8_PREFETCH(b, 210);
            __m512 sc = _mm512_mul_ps(f16x16(b + 208),
                                      _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const void *)(b + 192)))));
            __m512 ss[4];
            for (int u = 0; u < NT; u++)
                ss[u] = _mm512_mul_ps(sc, _mm512_permutexvar_ps(runs(0, 2),
                                                                 _mm512_castps256_ps512(_mm256_loadu_ps(x[u].dx + 8 * blk))));
            for (int h = 0; h < 2; h++) {
                __m512i ql = _mm512_loadu_si512((const void *)(b + 64 * h));
                __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const void *)(b + 128 + 32 * h)));
                __m512i lo = _mm512_ternarylogic_epi32(_mm512_and_si512(ql, low4), _mm512_sllv_epi16(qh, up), two, 0xF8);
                __m512i hi = _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srli_epi16(ql, 4), low4),
                                                       _mm512_srlv_epi16(qh, down), two, 0xF8);  /* a | (b & c) */
                const int64_t i = 256 * blk + 128 * h;
                for (int u = 0; u < NT; u++) {
                    acc[u][0] = dot_q(lo, z_at(x + u, 32, i), x[u].q + i, _mm512_permutexvar_ps(runs(8 * h, 4), ss[u]),
                                      acc[u][0]);
                    acc[u][1] = dot_q(hi, z_at(x + u, 32, i + 64), x[u].q + i + 64,
                                      _mm512_permutexvar_ps(runs(8 * h + 4, 4), ss[u]), acc[u][1]);
                }
            }
        }
        Q8_PUT(NT)
    }
}

#define Q8_ROWS(TY, NT) \
    if (TY == Q6_K) q8_rows_q6k(NT, w, r0, r1, m, k, x, t0, o); \
    else if (TY >= Q4_K) q8_rows_k4(TY, NT, w, r0, r1, m, k, x, t0, o); \
    else q8_rows32(TY, NT, w, r0, r1, m, k, x, t0, o)
#define Q8_NTS(TY, _) \
    switch (nt) { \
    case 1: Q8_ROWS(TY, 1); break; case 2: Q8_ROWS(TY, 2); break; default: Q8_ROWS(TY, 4); break; \
    }

static void q8_part(int t, int nt, const uint8_t *w, int64_t r0, int64_t r1, int64_t m, int64_t k, const xq_t *x,
                    int64_t t0, const out_t *o) {
    if (t == Q2_K || t == Q3_K) return;  /* not on this path (dn_gguf_q8_types) */
    EACH_TYPE(Q8_NTS, 0)
}

typedef struct { int t; const uint8_t *w; int64_t m, k; const xq_t *x; int64_t T; const out_t *o; int64_t rows; } q8_job;

static void q8_chunk(const void *job, int64_t c) {
    const q8_job *j = job;
    const int64_t r0 = c * j->rows, r1 = r0 + j->rows < j->m ? r0 + j->rows : j->m;
    for (int64_t t0 = 0, nt; t0 < j->T; t0 += nt) {
        nt = j->T - t0 >= 4 ? 4 : j->T - t0 >= 2 ? 2 : 1;
        q8_part(j->t, (int)nt, j->w, r0, r1, j->m, j->k, j->x + t0, t0, j->o);
    }
}
#endif

/* The types the integer path computes on this CPU (a bit per ggml id): none without AVX512_VNNI (cpuid), or where
 * the compiler did not target it. */
unsigned dn_gguf_q8_types(void) {
#ifdef Q8_TYPES
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
        return Q8_TYPES;
#endif
    return 0;
}

/* x [k] (float32, or bfloat16 where bf16) -> its 8-bit copy q [k], dx [k / 32], as the integer path makes it. */
int dn_gguf_quantize_q8(const void *x, int bf16, int64_t k, int8_t *q, float *dx) {
#ifdef Q8_TYPES
    if (!dn_gguf_q8_types() || k % 32) return -3;
    float xs[k / 32 + 1];
    quantize_x(x, bf16, k, 0, q, dx, NULL, xs);
    return 0;
#else
    (void)x, (void)bf16, (void)k, (void)q, (void)dx;
    return -3;
#endif
}

/* y [T, m] = x [T, k] @ W.T (+ bias [m], or NULL) through 8-bit x; float32, or bfloat16: x where bf16 & 1, y and
 * bias where bf16 & 2. -3: not on this CPU or not this type (dn_gguf_q8_types): the caller takes dn_gguf_matmul. */
int dn_gguf_matmul_q8(int t, const uint8_t *w, int64_t m, int64_t k, const void *x, int64_t T, void *y,
                      const void *bias, int bf16, int threads) {
    if (!known(t)) return -1;
    if (!(dn_gguf_q8_types() >> t & 1)) return -3;
#ifdef Q8_TYPES
    const int64_t kp = (k + 511) / 512 * 512, per = kp + kp / 4 + kp / 8 + kp;  /* q, dx, xs, z */
    uint8_t *buf = calloc((size_t)(T * per + 64), 1);
    if (!buf) return -2;
    xq_t *xs = malloc(sizeof(xq_t) * (size_t)T);
    if (!xs) return free(buf), -2;
    uint8_t *at = (uint8_t *)(((uintptr_t)buf + 63) & ~(uintptr_t)63);
    for (int64_t i = 0; i < T; i++, at += per) {
        int8_t *q = (int8_t *)at;
        float *dx = (float *)(at + kp), *s = (float *)(at + kp + kp / 4);
        int32_t *z = (int32_t *)(at + kp + kp / 4 + kp / 8);
        quantize_x((const uint8_t *)x + i * k * (bf16 & 1 ? 2 : 4), bf16 & 1, k, t, q, dx, z, s);
        xs[i] = (xq_t){q, dx, s, z};
    }
    const out_t o = {y, bias, bf16 >> 1 & 1};
    const q8_job j = {t, w, m, k, xs, T, &o, chunk_rows(m, k / bw(t) * block_bytes(t))};
    run(q8_chunk, &j, (m + j.rows - 1) / j.rows, threads);
    free(xs), free(buf);
#else
    (void)w, (void)m, (void)k, (void)x, (void)T, (void)y, (void)bias, (void)bf16, (void)threads;
#endif
    return 0;
}
