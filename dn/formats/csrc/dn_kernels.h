/* What the CPU kernels in dn/formats/csrc share: the MLP activations by kind and bf16 -> float. */
#ifndef DN_KERNELS_H
#define DN_KERNELS_H
#include <math.h>
#include <stdint.h>

/* the activations' numbers: dn/core/activations.py's ACTS (tests/test_sparse.py holds them equal) */
#define ACT_SILU 0
#define ACT_GELU_TANH 1

static inline float act(int kind, float g) {
    if (kind == ACT_GELU_TANH)
        return 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
    return g / (1.0f + expf(-g));
}

static inline float bf16(uint16_t v) {
    union { uint32_t u; float f; } b = {(uint32_t)v << 16};
    return b.f;
}

#endif
