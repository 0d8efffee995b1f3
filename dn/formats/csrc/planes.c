/* The sparse MLP on split planes (dn/formats/planes.py, the numpy reference) for a few tokens (decode), in one pass
 * over the neurons. For neuron j and token t:
 *   g^, u^ = the gate and up rows' sketches (6 bits a weight) . x_t;  est = act(g^) u^;  kept iff |est| > thresh[j]
 *   kept:    the rows' rest planes complete the exact bf16 weights: h = act(g . x_t) (u . x_t) - c[j];  y_t += h down_j
 *   skipped: y_t += est down~_j (the down row's sketch), with the sketch prior
 * Threshold selection decides each neuron alone, so the router and the neurons share one stream: a skipped neuron's
 * rest is never read, and a kept one's sketch was just read. y (float32 [T, d]) comes in holding y0; mask (uint8
 * [T, n]) is written (route = 1) or read (route = 0: replay a given selection).
 * Decoding: a weight's sketch code q = r | m6 << 4 | sign << 5 (r its 4-bit exponent rank, m6 the mantissa's top bit)
 * indexes two 64-entry tables: the router's bf16 w^ and the exact bits' high part; the rest adds the 6 low mantissa
 * bits. Escapes decode as 0 and are added from their lists. AVX-512 VBMI + BF16 (64 weights a step, vdpbf16ps dots)
 * behind #if, a portable loop otherwise; OpenMP over neurons with one y per thread. */
#include "dn_kernels.h"
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(__AVX512VBMI__) && defined(__AVX512BF16__)
#define FAST 1
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

enum { MAXT = 4 };
static const uint8_t ALL[MAXT] = {1, 1, 1, 1};  /* every token live */

typedef struct {
    const uint8_t *sketch, *rest;   /* [m, 3k/4] each */
    const int64_t *esc_ptr;         /* [m + 1] */
    const int32_t *esc_col;
    const uint16_t *esc_bits;
    const uint8_t *lut_w, *lut_hi;  /* [128] each: dn.formats.planes.luts() as 64 low bytes, then 64 high bytes */
} mat_t;

/* ---- one row: sketch dots, exact dots, axpys -------------------------------------------------------------------- */
/* Vector steps take 64 weights: 48 bytes of each plane become 64 codes (VBMI permute + multishift), two byte tables
 * (vpermb) give each weight's low and high byte, and byte unpacking pairs them into bf16 words in the order
 * 0-7,16-23,32-39,48-55 | 8-15,24-31,40-47,56-63 (unpack works per 128-bit lane). x and y are held in that order
 * (perm/unperm) for the blocks of 64; a row's tail (k % 64) runs in natural order. */

static inline int field(const uint8_t *row, int64_t i) {  /* the 6-bit field i of a plane row */
    const uint8_t *g = row + 6 * (i / 8);
    int b = 6 * (int)(i % 8);
    return ((g[b / 8] | (b / 8 < 5 ? g[b / 8 + 1] << 8 : 0)) >> (b % 8)) & 63;
}

static inline int64_t pos(int64_t col, int64_t k) {  /* where natural column col sits in x's held order */
    int64_t blk = col / 64, n = col % 64;
#ifndef FAST
    return col;
#endif
    if (col >= k / 64 * 64) return col;
    return blk * 64 + (n % 16 < 8 ? 8 * (n / 16) + n % 16 : 32 + 8 * (n / 16) + n % 16 - 8);
}

static inline int64_t slot(int64_t col, int64_t k) {  /* where natural column col sits in y's held order: per half of
                                                         a block, x's even positions, then its odd ones (axpy) */
    int64_t p = pos(col, k);
#ifndef FAST
    return p;
#endif
    if (col >= k / 64 * 64) return p;
    int64_t b = p - p % 64, q = p % 64;
    return b + (q & 32) + (q & 1 ? 16 : 0) + ((q & 31) >> 1);
}

static inline uint16_t exact_bits(const mat_t *m, const uint8_t *sk, const uint8_t *rest, int64_t i) {
    int q = field(sk, i);
    return (uint16_t)((m->lut_hi[64 + q] << 8 | m->lut_hi[q]) | field(rest, i));
}

static inline uint16_t sketch_bits(const mat_t *m, const uint8_t *sk, int64_t i) {
    int q = field(sk, i);
    return (uint16_t)(m->lut_w[64 + q] << 8 | m->lut_w[q]);
}

#ifdef FAST
static inline __m512i fields64(const uint8_t *p) {
    const __m512i spread = _mm512_set_epi64(0x2f2f2f2e2d2c2b2aLL, 0x2929292827262524LL, 0x2323232221201f1eLL,
                                            0x1d1d1d1c1b1a1918LL, 0x1717171615141312LL, 0x111111100f0e0d0cLL,
                                            0x0b0b0b0a09080706LL, 0x0505050403020100LL);
    const __m512i ctrl = _mm512_set1_epi64(0x2a241e18120c0600LL);
    __m512i v = _mm512_permutexvar_epi8(spread, _mm512_maskz_loadu_epi8(0xffffffffffffULL, p));
    return _mm512_and_si512(_mm512_multishift_epi64_epi8(ctrl, v), _mm512_set1_epi8(63));
}

typedef struct { __m512i lo, hi; } lut_t;

static inline lut_t lut(const uint8_t *t) {
    lut_t l = {_mm512_loadu_si512(t), _mm512_loadu_si512(t + 64)};
    return l;
}

/* 64 weights as bf16 words, [0] and [1] in the held order; rest NULL: the sketch's w^ */
static inline void words64(const uint8_t *sk, const uint8_t *rest, int64_t i, lut_t l, __m512i *w) {
    __m512i q = fields64(sk + 6 * (i / 8));
    __m512i lo = _mm512_permutexvar_epi8(q, l.lo), hi = _mm512_permutexvar_epi8(q, l.hi);
    if (rest) lo = _mm512_or_si512(lo, fields64(rest + 6 * (i / 8)));
    w[0] = _mm512_unpacklo_epi8(lo, hi);
    w[1] = _mm512_unpackhi_epi8(lo, hi);
}

static inline __m512 f32_of(__m512i w, int odd) {  /* w's even (odd) bf16 words -> float32, no shuffle */
    return _mm512_castsi512_ps(odd ? _mm512_and_si512(w, _mm512_set1_epi32((int)0xffff0000u)) : _mm512_slli_epi32(w, 16));
}
#endif

/* out[t] = w . x_t for the row's sketch w^ (rest NULL) or its exact weights, for the tokens with live[t]; xp: x in the
 * held order, x: natural (escapes, tail) */
static void dot(const mat_t *m, int64_t j, int64_t k, const uint16_t *xp, const uint16_t *x, int64_t T,
                const uint8_t *live, int exact, int64_t next, float *out) {
    const uint8_t *sk = m->sketch + j * (3 * k / 4), *rest = exact ? m->rest + j * (3 * k / 4) : NULL;
    /* the next row this pass reads (next >= 0), a line ahead per step: a whole row's prefetches at once would stall
     * on the fill buffers */
    const uint8_t *pf = next < 0 ? NULL : (exact ? m->rest : m->sketch) + next * (3 * k / 4);
    (void)pf, (void)xp, (void)live;  /* the vector path's */
    int64_t i = 0;
    for (int64_t t = 0; t < T; t++) out[t] = 0;
#ifdef FAST
    lut_t l = lut(exact ? m->lut_hi : m->lut_w);
    if (T == 1) {  /* decode: two accumulators in registers */
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        for (; i + 64 <= k; i += 64) {
            __m512i w[2];
            if (pf) __builtin_prefetch(pf + 6 * (i / 8));
            words64(sk, rest, i, l, w);
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)w[0], (__m512bh)_mm512_loadu_si512(xp + i));
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)w[1], (__m512bh)_mm512_loadu_si512(xp + i + 32));
        }
        out[0] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
    __m512 acc[MAXT];
    for (int t = 0; t < MAXT; t++) acc[t] = _mm512_setzero_ps();
    for (; i + 64 <= k; i += 64) {
        __m512i w[2];
        if (pf) __builtin_prefetch(pf + 6 * (i / 8));
        words64(sk, rest, i, l, w);
        for (int64_t t = 0; t < T; t++) {
            if (!live[t]) continue;
            const uint16_t *xt = xp + t * k + i;
            acc[t] = _mm512_dpbf16_ps(acc[t], (__m512bh)w[0], (__m512bh)_mm512_loadu_si512(xt));
            acc[t] = _mm512_dpbf16_ps(acc[t], (__m512bh)w[1], (__m512bh)_mm512_loadu_si512(xt + 32));
        }
    }
    if (T > 1)
        for (int64_t t = 0; t < T; t++) out[t] = _mm512_reduce_add_ps(acc[t]);
#endif
    for (; i < k; i++) {
        float w = bf16(exact ? exact_bits(m, sk, rest, i) : sketch_bits(m, sk, i));
        for (int64_t t = 0; t < T; t++) out[t] += w * bf16(x[t * k + i]);
    }
    if (exact)
        for (int64_t e = m->esc_ptr[j]; e < m->esc_ptr[j + 1]; e++)
            for (int64_t t = 0; t < T; t++) out[t] += bf16(m->esc_bits[e]) * bf16(x[t * k + m->esc_col[e]]);
}

/* y_t += h[t] w (y in its held order) for the row's exact weights or its sketch; h[t] = 0 skips token t */
static void axpy(const mat_t *m, int64_t j, int64_t k, const float *h, int64_t T, int exact, int64_t next,
                 int next_exact, float *y) {
    const uint8_t *sk = m->sketch + j * (3 * k / 4), *rest = exact ? m->rest + j * (3 * k / 4) : NULL;
    const uint8_t *pf = next < 0 ? NULL : m->sketch + next * (3 * k / 4);  /* as in dot */
    const uint8_t *pf2 = next < 0 || !next_exact ? NULL : m->rest + next * (3 * k / 4);
    (void)pf, (void)pf2;
    int64_t i = 0;
#ifdef FAST
    lut_t l = lut(exact ? m->lut_hi : m->lut_w);
    for (; i + 64 <= k; i += 64) {
        __m512i w[2];
        if (pf) __builtin_prefetch(pf + 6 * (i / 8));
        if (pf2) __builtin_prefetch(pf2 + 6 * (i / 8));
        words64(sk, rest, i, l, w);
        __m512 v[4] = {f32_of(w[0], 0), f32_of(w[0], 1), f32_of(w[1], 0), f32_of(w[1], 1)};
        if (T == 1) {
            __m512 hv = _mm512_set1_ps(h[0]);
            for (int s = 0; s < 4; s++) _mm512_storeu_ps(y + i + 16 * s, _mm512_fmadd_ps(hv, v[s], _mm512_loadu_ps(y + i + 16 * s)));
            continue;
        }
        for (int64_t t = 0; t < T; t++) {
            if (h[t] == 0) continue;
            __m512 hv = _mm512_set1_ps(h[t]);
            float *yt = y + t * k + i;
            for (int s = 0; s < 4; s++) _mm512_storeu_ps(yt + 16 * s, _mm512_fmadd_ps(hv, v[s], _mm512_loadu_ps(yt + 16 * s)));
        }
    }
#endif
    for (; i < k; i++) {
        float w = bf16(exact ? exact_bits(m, sk, rest, i) : sketch_bits(m, sk, i));
        for (int64_t t = 0; t < T; t++) y[t * k + i] += h[t] * w;
    }
    if (exact)
        for (int64_t e = m->esc_ptr[j]; e < m->esc_ptr[j + 1]; e++)
            for (int64_t t = 0; t < T; t++) y[t * k + slot(m->esc_col[e], k)] += h[t] * bf16(m->esc_bits[e]);
}

/* Per-thread float32 accumulators [threads][T, d] in y's held order (threads clamped: a thread per 64 neurons at
 * least), summed into y (natural order) by finish(). */
static int team(int threads, int64_t n) {
#ifdef _OPENMP
    return threads < 1 || n < 64 * threads ? 1 : threads;
#else
    (void)threads, (void)n;
    return 1;
#endif
}

static void finish(float *acc, int threads, int64_t T, int64_t d, float *y) {
    for (int t = 0; t < threads; t++)
        for (int64_t i = 0; i < T * d; i++) y[i] += acc[(size_t)t * T * d + (i / d) * d + slot(i % d, d)];
    free(acc);
}

static int thread_id(int64_t *j0, int64_t *j1, int64_t n) {  /* this thread's share of the n neurons */
#ifdef _OPENMP
    int t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
    int t = 0, nt = 1;
#endif
    *j0 = n * t / nt, *j1 = n * (t + 1) / nt;
    return t;
}

static uint16_t *held_x(const uint16_t *x, int64_t T, int64_t d) {  /* x in its held order (malloc'd; NULL: none) */
    uint16_t *xp = malloc((size_t)T * d * sizeof(uint16_t));
    if (xp)
        for (int64_t i = 0; i < T * d; i++) xp[(i / d) * d + pos(i % d, d)] = x[i];
    return xp;
}

enum { BLOCK = 32 };  /* neurons routed before their kept ones are read: the sketches stay in L2 meanwhile */

static void neurons(const uint16_t *xp, const uint16_t *x, int64_t T, int64_t n, int64_t d, const mat_t *g,
                    const mat_t *u, const mat_t *dn, const float *thresh, const float *c, int sketch, int route,
                    uint8_t *mask, float *y, int kind, int64_t j0, int64_t j1) {
    float est[BLOCK][MAXT], gs[MAXT], us[MAXT], h[MAXT];
    uint8_t keep[BLOCK][MAXT];
    int64_t kept[BLOCK], skipped[BLOCK];
    for (int64_t jb = j0; jb < j1; jb += BLOCK) {
        int64_t je = jb + BLOCK < j1 ? jb + BLOCK : j1, nk = 0, ns = 0;
        for (int64_t j = jb; j < je; j++) {  /* route the block */
            int64_t next = j + 1 < j1 ? j + 1 : -1;
            dot(g, j, d, xp, x, T, ALL, 0, next, gs);
            dot(u, j, d, xp, x, T, ALL, 0, next, us);
            int any = 0, none = 0;
            for (int64_t t = 0; t < T; t++) {
                float e = act(kind, gs[t]) * us[t];
                uint8_t k = route ? fabsf(e) > thresh[j] : mask[t * n + j] != 0;
                if (route) mask[t * n + j] = k;
                est[j - jb][t] = k ? 0.0f : e, keep[j - jb][t] = k;
                any |= k, none |= !k;
            }
            if (any) kept[nk++] = j;
            if (none && sketch) skipped[ns++] = j;
        }
        for (int64_t q = 0; q < nk; q++) {  /* the kept: their rests complete the weights */
            int64_t j = kept[q], next = q + 1 < nk ? kept[q + 1] : -1;
            dot(g, j, d, xp, x, T, keep[j - jb], 1, next, gs);
            dot(u, j, d, xp, x, T, keep[j - jb], 1, next, us);
            for (int64_t t = 0; t < T; t++) h[t] = keep[j - jb][t] ? act(kind, gs[t]) * us[t] - c[j] : 0.0f;
            axpy(dn, j, d, h, T, 1, next, 1, y);
        }
        for (int64_t q = 0; q < ns; q++)  /* the skipped, with the sketch prior: est down~ */
            axpy(dn, skipped[q], d, est[skipped[q] - jb], T, 0, q + 1 < ns ? skipped[q + 1] : -1, 0, y);
    }
}

/* x bf16 [T, d] (T <= 4), the gate, up and down (its columns as rows) matrices [n, d] in split planes. Returns 0,
 * -1 for T out of range, -2 when out of memory. */
int dn_planes_step(const uint16_t *x, int64_t T, int64_t n, int64_t d, const mat_t *g, const mat_t *u,
                   const mat_t *dn, const float *thresh, const float *c, int sketch, int route, uint8_t *mask,
                   float *y, int kind, int threads) {
    if (T < 1 || T > MAXT) return -1;
    threads = team(threads, n);
    uint16_t *xp = held_x(x, T, d);
    float *acc = calloc((size_t)threads * T * d, sizeof(float));
    if (!xp || !acc) {
        free(xp), free(acc);
        return -2;
    }
#pragma omp parallel num_threads(threads)
    {
        int64_t j0, j1;
        int t = thread_id(&j0, &j1, n);
        neurons(xp, x, T, n, d, g, u, dn, thresh, c, sketch, route, mask, acc + (size_t)t * T * d, kind, j0, j1);
    }
    finish(acc, threads, T, d, y);
    free(xp);
    return 0;
}

/* A matrix's exact bf16 bits [m, k] in natural order, or (exact = 0) its sketch's w^ (prefill, plain paths). */
void dn_planes_join(const mat_t *m, int64_t rows, int64_t k, uint16_t *out, int exact, int threads) {
    (void)threads;
#ifdef FAST
    int16_t nat[64];  /* natural position n of a block comes from held position pos(n): words 0-63 of w[0], w[1] */
    for (int q = 0; q < 64; q++) nat[q] = (int16_t)pos(q, 64);
#endif
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static)
    for (int64_t j = 0; j < rows; j++) {
        const uint8_t *sk = m->sketch + j * (3 * k / 4), *rest = exact ? m->rest + j * (3 * k / 4) : NULL;
        uint16_t *o = out + j * k;
        int64_t i = 0;
#ifdef FAST
        lut_t l = lut(exact ? m->lut_hi : m->lut_w);
        __m512i nat0 = _mm512_loadu_si512(nat), nat1 = _mm512_loadu_si512(nat + 32);
        for (; i + 64 <= k; i += 64) {
            __m512i w[2];
            words64(sk, rest, i, l, w);
            _mm512_storeu_si512(o + i, _mm512_permutex2var_epi16(w[0], nat0, w[1]));
            _mm512_storeu_si512(o + i + 32, _mm512_permutex2var_epi16(w[0], nat1, w[1]));
        }
#endif
        for (; i < k; i++) o[i] = exact ? exact_bits(m, sk, rest, i) : sketch_bits(m, sk, i);
        if (exact)
            for (int64_t e = m->esc_ptr[j]; e < m->esc_ptr[j + 1]; e++) o[m->esc_col[e]] = m->esc_bits[e];
    }
}

/* The router alone: est [T, n] = act(g^) u^ from the gate and up sketches (T <= 4; residency's routers, whose
 * neurons live elsewhere). Returns 0, -1 for T out of range, -2 when out of memory. */
int dn_planes_estimate(const uint16_t *x, int64_t T, int64_t n, int64_t d, const mat_t *g, const mat_t *u,
                       int kind, float *est, int threads) {
    (void)threads;
    if (T < 1 || T > MAXT) return -1;
    uint16_t *xp = held_x(x, T, d);
    if (!xp) return -2;
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static)
    for (int64_t j = 0; j < n; j++) {
        float gs[MAXT], us[MAXT];
        dot(g, j, d, xp, x, T, ALL, 0, j + 1 < n ? j + 1 : -1, gs);
        dot(u, j, d, xp, x, T, ALL, 0, j + 1 < n ? j + 1 : -1, us);
        for (int64_t t = 0; t < T; t++) est[t * n + j] = act(kind, gs[t]) * us[t];
    }
    free(xp);
    return 0;
}

/* The sketch prior alone: y [T, d] += sum over neurons j of h[t, j] down~_j, skipping h = 0 (T <= 4). */
int dn_planes_sketch(const float *h, int64_t T, int64_t n, int64_t d, const mat_t *dn, float *y, int threads) {
    if (T < 1 || T > MAXT) return -1;
    threads = team(threads, n);
    float *acc = calloc((size_t)threads * T * d, sizeof(float));
    if (!acc) return -2;
#pragma omp parallel num_threads(threads)
    {
        int64_t j0, j1;
        int th = thread_id(&j0, &j1, n);
        for (int64_t j = j0; j < j1; j++) {
            float hj[MAXT];
            int any = 0;
            for (int64_t t = 0; t < T; t++) hj[t] = h[t * n + j], any |= hj[t] != 0;
            if (any) axpy(dn, j, d, hj, T, 0, j + 1 < j1 ? j + 1 : -1, 0, acc + (size_t)th * T * d);
        }
    }
    finish(acc, threads, T, d, y);
    return 0;
}

/* 1 when this build took the AVX-512 VBMI + BF16 path (tests, reports). */
int dn_planes_isa(void) {
#ifdef FAST
    return 1;
#else
    return 0;
#endif
}
