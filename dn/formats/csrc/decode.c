/* The small steps of a decoder layer between its matmuls, for one token per sequence in bfloat16 (the torch
 * decode step, dn_torch/_decode.py): each is one call where torch runs 4 to 20 ops, each op a dispatch that costs
 * more than its arithmetic at this size. Reference: dn/formats/decode.py (numpy), which says what is rounded where.
 *   dn_add_norm:   h += y (rounded to bf16), then out = w * bf16(h * rsqrt(mean(h^2) + eps)) (LlamaRMSNorm's
 *                  order and roundings); y NULL: the norm alone.
 *   dn_attend:     rope (cos, sin [hd]: every sequence at position n) on the queries and keys of a fused q|k|v
 *                  row, in place; its keys and values written into the cache [batch, nkv, cap, hd] at position
 *                  n; each query head attending over positions 0..n of its key head (float32 scores and sums,
 *                  the weights rounded to bf16 for the values' sum, as torch's CPU flash attention does).
 *   dn_silu_mul:   out = bf16(silu(g)) * u over a fused g|u row (what act(gate) * up rounds).
 * Single-threaded: the work is a few microseconds. Returns 0. */
#pragma STDC FP_CONTRACT OFF
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "dn_kernels.h"

static inline uint16_t to_bf16(float f) {  /* round to nearest even, as torch's conversions */
    union { float f; uint32_t u; } b = {f};
    if ((b.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((b.u >> 16) | 0x40);  /* NaN stays NaN */
    return (uint16_t)((b.u + 0x7fffu + ((b.u >> 16) & 1u)) >> 16);
}

static inline float r16(float f) { return bf16(to_bf16(f)); }

int dn_add_norm(uint16_t *h, const uint16_t *y, const uint16_t *w, float eps, int64_t d, int64_t rows,
                uint16_t *out) {
    for (int64_t r = 0; r < rows; r++) {
        uint16_t *hr = h + r * d, *o = out + r * d;
        float ss = 0.0f;
        for (int64_t i = 0; i < d; i++) {
            if (y) hr[i] = to_bf16(bf16(hr[i]) + bf16(y[r * d + i]));
            float v = bf16(hr[i]);
            ss += v * v;
        }
        float inv = 1.0f / sqrtf(ss / (float)d + eps);
        for (int64_t i = 0; i < d; i++) o[i] = to_bf16(bf16(w[i]) * r16(bf16(hr[i]) * inv));
    }
    return 0;
}

/* x rotated in place: x * cos + rotate_half(x) * sin, each product and the sum rounded (torch's bf16 ops) */
static void rope(uint16_t *x, const uint16_t *cos, const uint16_t *sin, int64_t hd) {
    int64_t half = hd / 2;
    float a[512];
    for (int64_t i = 0; i < hd; i++) a[i] = bf16(x[i]);
    for (int64_t i = 0; i < hd; i++) {
        float s = bf16(sin[i]), t = i < half ? -(a[i + half] * s) : a[i - half] * s;
        x[i] = to_bf16(r16(a[i] * bf16(cos[i])) + r16(t));
    }
}

int dn_attend(uint16_t *qkv, int64_t batch, int64_t nq, int64_t nkv, int64_t hd, const uint16_t *cos,
              const uint16_t *sin, uint16_t *keys, uint16_t *values, int64_t cap, int64_t n, float scale,
              uint16_t *out) {
    if (hd > 512) return -1;
    int64_t row = (nq + 2 * nkv) * hd, group = nq / nkv;
    float *p = malloc(sizeof(float) * (size_t)(n + 1)), acc[512];
    if (!p) return -2;
    for (int64_t b = 0; b < batch; b++) {
        uint16_t *x = qkv + b * row;
        for (int64_t h = 0; h < nq + nkv; h++) rope(x + h * hd, cos, sin, hd);
        for (int64_t g = 0; g < nkv; g++) {
            uint16_t *kc = keys + ((b * nkv + g) * cap + n) * hd, *vc = values + ((b * nkv + g) * cap + n) * hd;
            for (int64_t i = 0; i < hd; i++) {
                kc[i] = x[(nq + g) * hd + i];
                vc[i] = x[(nq + nkv + g) * hd + i];
            }
        }
        for (int64_t h = 0; h < nq; h++) {
            const uint16_t *q = x + h * hd;
            const uint16_t *k = keys + (b * nkv + h / group) * cap * hd, *v = values + (b * nkv + h / group) * cap * hd;
            float mx = -INFINITY, sum = 0.0f;
            for (int64_t j = 0; j <= n; j++) {
                float s = 0.0f;
                for (int64_t i = 0; i < hd; i++) s += bf16(q[i]) * bf16(k[j * hd + i]);
                p[j] = s * scale;
                if (p[j] > mx) mx = p[j];
            }
            for (int64_t i = 0; i < hd; i++) acc[i] = 0.0f;
            for (int64_t j = 0; j <= n; j++) {
                float e = expf(p[j] - mx);
                sum += e;
                float e16 = r16(e);  /* P at the values dtype, as torch's CPU flash attention multiplies it */
                for (int64_t i = 0; i < hd; i++) acc[i] += e16 * bf16(v[j * hd + i]);
            }
            for (int64_t i = 0; i < hd; i++) out[(b * nq + h) * hd + i] = to_bf16(acc[i] / sum);
        }
    }
    free(p);
    return 0;
}

int dn_silu_mul(const uint16_t *gu, int64_t n, int64_t rows, uint16_t *out) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < n; i++)
            out[r * n + i] = to_bf16(r16(act(ACT_SILU, bf16(gu[r * 2 * n + i]))) * bf16(gu[r * 2 * n + n + i]));
    return 0;
}
