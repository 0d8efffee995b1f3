/* The sparse MLP's kept neurons for a few tokens (decode), read straight from their bundles (dn/formats/sparse.py:
 * bundle[j] = [gate row | up row | down column], [n, 3, d]): no gathered copy. For each token t and kept j:
 *   h = act(gate_j . x_t) * (up_j . x_t) - c[j];  y_t += h * down_j
 * each bundle read once for all the tokens that keep it. y (float32 [T, d]) comes in holding the prior's y0. Weights,
 * x and c are bf16 (raw uint16) or float32; every dot and the accumulation run in float32. AVX-512 (with
 * AVX512_BF16's pair dots where the CPU has them) behind #ifdef, a portable loop otherwise; OpenMP over neurons with
 * one y per thread when threads > 1. */
#include "dn_kernels.h"
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

/* The next kept bundle is elsewhere, and the hardware's streamers stop at page boundaries and restart cold at each
 * jump: ask for all of its lines while this one computes. */
static inline void prefetch(const char *p, int64_t bytes) {
    for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(p + i);
}

/* ---- bf16 ---------------------------------------------------------------------------------------- */

static void dots_bf16(const uint16_t *x, const uint16_t *wg, const uint16_t *wu, int64_t d, float *g, float *u) {
    int64_t i = 0;
    float sg = 0, su = 0;
#if defined(__AVX512BF16__)
    __m512 ag = _mm512_setzero_ps(), au = _mm512_setzero_ps();
    for (; i + 32 <= d; i += 32) {  /* 32 bf16 per load: products exact in float32, pairs summed */
        __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i);
        ag = _mm512_dpbf16_ps(ag, (__m512bh)_mm512_loadu_si512(wg + i), xv);
        au = _mm512_dpbf16_ps(au, (__m512bh)_mm512_loadu_si512(wu + i), xv);
    }
    sg = _mm512_reduce_add_ps(ag), su = _mm512_reduce_add_ps(au);
#elif defined(__AVX512F__)
    __m512 ag = _mm512_setzero_ps(), au = _mm512_setzero_ps();
    for (; i + 16 <= d; i += 16) {
        __m512 xv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)(x + i))), 16));
        __m512 gv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)(wg + i))), 16));
        __m512 uv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)(wu + i))), 16));
        ag = _mm512_fmadd_ps(gv, xv, ag);
        au = _mm512_fmadd_ps(uv, xv, au);
    }
    sg = _mm512_reduce_add_ps(ag), su = _mm512_reduce_add_ps(au);
#endif
    for (; i < d; i++) {
        sg += bf16(wg[i]) * bf16(x[i]);
        su += bf16(wu[i]) * bf16(x[i]);
    }
    *g = sg, *u = su;
}

static void axpy_bf16(float h, const uint16_t *wd, float *y, int64_t d) {
    int64_t i = 0;
#ifdef __AVX512F__
    __m512 hv = _mm512_set1_ps(h);
    for (; i + 16 <= d; i += 16) {
        __m512 dv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)(wd + i))), 16));
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(hv, dv, _mm512_loadu_ps(y + i)));
    }
#endif
    for (; i < d; i++) y[i] += h * bf16(wd[i]);
}

static void neurons_bf16(const uint16_t *x, const uint16_t *w, const int32_t *list, int64_t k0, int64_t k1,
                         int64_t d, int64_t n, int64_t T, const uint8_t *mask, const uint16_t *c, float *y, int kind) {
    for (int64_t q = k0; q < k1; q++) {
        int64_t j = list[q];
        const uint16_t *b = w + j * 3 * d;
        if (q + 1 < k1) prefetch((const char *)(w + (int64_t)list[q + 1] * 3 * d), 6 * d);
        for (int64_t t = 0; t < T; t++) {  /* a bundle is read once for every token that keeps it */
            if (!mask[t * n + j]) continue;
            float g, u;
            dots_bf16(x + t * d, b, b + d, d, &g, &u);
            axpy_bf16(act(kind, g) * u - bf16(c[j]), b + 2 * d, y + t * d, d);
        }
    }
}

/* ---- float32 ------------------------------------------------------------------------------------- */

static void neurons_f32(const float *x, const float *w, const int32_t *list, int64_t k0, int64_t k1, int64_t d,
                        int64_t n, int64_t T, const uint8_t *mask, const float *c, float *y, int kind) {
    for (int64_t q = k0; q < k1; q++) {
        int64_t j = list[q];
        const float *b = w + j * 3 * d;
        if (q + 1 < k1) prefetch((const char *)(w + (int64_t)list[q + 1] * 3 * d), 12 * d);
        for (int64_t t = 0; t < T; t++) {
            if (!mask[t * n + j]) continue;
            const float *xt = x + t * d;
            float *yt = y + t * d;
            float g = 0, u = 0, h;
            int64_t i = 0;
#ifdef __AVX512F__
            __m512 ag = _mm512_setzero_ps(), au = _mm512_setzero_ps();
            for (; i + 16 <= d; i += 16) {
                __m512 xv = _mm512_loadu_ps(xt + i);
                ag = _mm512_fmadd_ps(_mm512_loadu_ps(b + i), xv, ag);
                au = _mm512_fmadd_ps(_mm512_loadu_ps(b + d + i), xv, au);
            }
            g = _mm512_reduce_add_ps(ag), u = _mm512_reduce_add_ps(au);
#endif
            for (; i < d; i++) g += b[i] * xt[i], u += b[d + i] * xt[i];
            h = act(kind, g) * u - c[j];
            for (i = 0; i < d; i++) yt[i] += h * b[2 * d + i];   /* no reduction: the compiler vectorizes it */
        }
    }
}

/* ---- entry points -------------------------------------------------------------------------------- */

typedef void (*part_fn)(const void *, const void *, const int32_t *, int64_t, int64_t, int64_t, int64_t, int64_t,
                        const uint8_t *, const void *, float *, int);

/* x [T, d], w [n, 3, d], mask bool [T, n] (the kept neurons per token, any count), c [n]; y float32 [T, d] holds
 * y0 on entry. The neurons any token keeps are listed once, then split between threads. */
static void run(part_fn part, const void *x, const void *w, const uint8_t *mask, int64_t T, int64_t n, int64_t d,
                const void *c, float *y, int kind, int threads) {
    int32_t *list = malloc((size_t)n * sizeof(int32_t));
    if (!list) return;
    int64_t k = 0;
    for (int64_t j = 0; j < n; j++) {
        int any = 0;
        for (int64_t t = 0; t < T; t++) any |= mask[t * n + j];
        if (any) list[k++] = (int32_t)j;
    }
#ifdef _OPENMP
    if (threads > 1 && k >= 8 * threads) {
        float *acc = calloc((size_t)threads * T * d, sizeof(float));
        if (acc) {
#pragma omp parallel num_threads(threads)
            {
                int t = omp_get_thread_num(), nt = omp_get_num_threads();
                part(x, w, list, k * t / nt, k * (t + 1) / nt, d, n, T, mask, c, acc + (size_t)t * T * d, kind);
            }
            for (int t = 0; t < threads; t++)
                for (int64_t i = 0; i < T * d; i++) y[i] += acc[(size_t)t * T * d + i];
            free(acc);
            free(list);
            return;
        }
    }
#endif
    (void)threads;
    part(x, w, list, 0, k, d, n, T, mask, c, y, kind);
    free(list);
}

void dn_sparse_kept_bf16(const uint16_t *x, const uint16_t *w, const uint8_t *mask, int64_t T, int64_t n,
                         int64_t d, const uint16_t *c, float *y, int kind, int threads) {
    run((part_fn)neurons_bf16, x, w, mask, T, n, d, c, y, kind, threads);
}

void dn_sparse_kept_f32(const float *x, const float *w, const uint8_t *mask, int64_t T, int64_t n, int64_t d,
                        const float *c, float *y, int kind, int threads) {
    run((part_fn)neurons_f32, x, w, mask, T, n, d, c, y, kind, threads);
}

/* 1 when this build took the AVX512_BF16 pair dots, 2 plain AVX-512, 0 the portable loop (tests, reports). */
int dn_sparse_isa(void) {
#if defined(__AVX512BF16__)
    return 1;
#elif defined(__AVX512F__)
    return 2;
#else
    return 0;
#endif
}
