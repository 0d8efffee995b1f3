"""Numerical tolerances, defined once and imported by tests, parity and kernels' checks."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Tol:
    rtol: float
    atol: float


# Kernel fast path vs numpy reference, per compute dtype.
KERNEL = {"float32": Tol(rtol=1e-5, atol=1e-5), "bfloat16": Tol(rtol=2e-2, atol=2e-2),
          "float16": Tol(rtol=5e-3, atol=5e-3)}


@dataclass(frozen=True)
class ParityTol:
    max_rel_err: float            # max over positions of max|dlogit| / max|logit|
    greedy_agreement: float | None  # required fraction of equal greedy tokens (None: report only)
    hidden_rel_err: float         # per-layer hidden-state divergence threshold


# Backend vs backend on the same model (foundation issue thresholds).
PARITY = {"float32": ParityTol(1e-4, 1.0, 1e-4), "bfloat16": ParityTol(2e-2, None, 2e-2)}

# Sparse models: fraction of router keep/skip decisions two backends must share on the same inputs.
ROUTE_AGREEMENT = 0.999

# A quantized model vs a dense folder holding its dequantized weights, same compute dtype: max over positions
# of max|dlogit| / max|logit|. float32 computes on the same values; bfloat16 rounds the weights differently
# (16-bit zero points, kernel accumulation order), i.e. bf16 noise, which on the tiny random test models
# reaches 0.04 between the dense model in bfloat16 and in float32.
QUANT = {"float32": 1e-4, "bfloat16": 5e-2}

# GGUF blocks through 8-bit activations (dn/formats/csrc/gguf.c's integer path, llama.cpp's route) against float32
# x @ decode(W).T: max|dy| / max|y|. x rounded to 8 bits per 32 values errs by up to amax / 254 a value (0.4-0.7%
# of max|y| measured on Gaussian x); llama.cpp's own test of the same route (tests/test-quantize-fns.cpp) allows
# MAX_DOT_PRODUCT_ERROR = 0.02 per element against the float dot.
GGUF_Q8 = 2e-2
