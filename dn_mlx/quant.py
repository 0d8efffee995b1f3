"""Affine group-wise quantized weights (mlx-lm's format, dn/formats/quant.py) on MLX: mlx's own quantized layers.

affine_matmul, quantize_model and rows as dn_torch/quant.py has them; _compute_at for the loader (dn_mlx/model.py).

MLX's CPU kernel sums a 16-bit x's products in that 16-bit type (bf16 has no SIMD path there): 3-5% error per
matmul on SmolLM2's layers, +5.6% perplexity for a q4g32e8 folder (docs/results/bf16-mlx.json). So on a CPU a
16-bit x is multiplied in float32 and the result cast back; Metal's and CUDA's kernels already sum in float32."""

from __future__ import annotations

import mlx.core as mx
from mlx import nn


def _sums32(x: mx.array) -> bool:
    """Whether mlx's kernel would sum x's products in 16 bits: a 16-bit x on the CPU."""
    return x.dtype.size <= 2 and mx.default_device().type == mx.cpu


def affine_matmul(x: mx.array, packed: mx.array, scales: mx.array, biases: mx.array, bits: int,
                  group_size: int, mode: str = "affine", out=None) -> mx.array:
    """x [..., k] @ W.T for W [n, k] stored quantized (packed uint32 [n, k*bits/32], scales/biases [n, k/gs]), at
    x's dtype or `out`, summed in float32 (in float32 throughout where the kernel would not, or the dtypes differ)."""
    if x.dtype == scales.dtype and not _sums32(x) and out in (None, x.dtype):
        return mx.quantized_matmul(x, packed, scales, biases, transpose=True, group_size=group_size, bits=bits,
                                   mode=mode)
    f = mx.float32
    y = mx.quantized_matmul(x.astype(f), packed, scales.astype(f), biases.astype(f), transpose=True,
                            group_size=group_size, bits=bits, mode=mode)
    return y.astype(out or x.dtype)


def quantize_model(model: nn.Module, quantization: dict) -> nn.Module:
    """Swap the Linear and Embedding modules of a model skeleton for quantized ones, in place, as mlx-lm's
    loader does: a module's own entry of `quantization` (parameters, or False: stays dense), else the global
    bits and group size when the group size divides its input size. The skeleton's dense parameters are
    lazy and replaced by the stored ones before anything evaluates them."""
    group_size, bits = quantization["group_size"], quantization["bits"]

    def predicate(path: str, module: nn.Module):
        if path in quantization:
            return quantization[path]
        return hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0

    nn.quantize(model, group_size=group_size, bits=bits, mode=quantization.get("mode", "affine"),
                class_predicate=predicate)
    return model


def _dequantize(module: nn.Module, idx, dtype) -> mx.array:
    """Rows idx of a quantized module, dequantized in float32 (16-bit arithmetic rounds scale * q, about half a
    step of 8-bit codes) and cast to dtype."""
    f = mx.float32
    w = mx.dequantize(module["weight"][idx], module["scales"][idx].astype(f), module["biases"][idx].astype(f),
                      group_size=module.group_size, bits=module.bits, mode=module.mode)
    return w.astype(dtype)


def rows(module: nn.Module, idx) -> mx.array:
    """Dense rows W[idx] of a (quantized) Linear or Embedding at its compute dtype, dequantizing only them."""
    idx = mx.array(idx)
    if not isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return module.weight[idx]
    return _dequantize(module, idx, getattr(module, "_compute", module.scales.dtype))  # scales may be held 16-bit


class _Linear(nn.QuantizedLinear):
    """Multiplies through affine_matmul."""

    def __call__(self, x: mx.array) -> mx.array:
        y = affine_matmul(x, self["weight"], self["scales"], self["biases"], self.bits, self.group_size, self.mode)
        return y + self["bias"] if "bias" in self else y


class _Head(_Linear):
    """An output head: float32 logits. bf16's step is 0.125 at a logit of 25, so two candidates 0.11 apart in
    float32 tie once rounded (SmolLM2's "The" and "L" after "What is the capital of France?")."""

    def __call__(self, x: mx.array) -> mx.array:
        return super().__call__(x.astype(mx.float32))


class _Embedding(nn.QuantizedEmbedding):
    """Looks rows up at the compute dtype, whatever dtype its scales are held in; as a tied head, _Head's float32
    logits."""

    def __call__(self, x: mx.array) -> mx.array:
        return _dequantize(self, x, self._compute)

    def as_linear(self, x: mx.array) -> mx.array:
        return affine_matmul(x.astype(mx.float32), self["weight"], self["scales"], self["biases"], self.bits,
                             self.group_size, self.mode)


def _compute_at(model: nn.Module, dtype) -> None:
    """Every quantized module computes through affine_matmul, looks rows up in float32 (cast to the compute
    dtype) and, as the head, gives float32 logits. The loader holds 16-bit stored scales and biases as stored
    (dn.formats.quant.scale_dtype: exact in 32-bit arithmetic, half the bytes, as torch does), except that a GPU's
    kernel gets them at a 16-bit compute dtype (float16 ones rounded to bfloat16): it sums in float32 already,
    and mixed dtypes would cast per call."""
    gpu = dtype.size <= 2 and mx.default_device().type != mx.cpu
    for path, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and module.mode == "affine":
            object.__setattr__(module, "_compute", dtype)  # a plain attribute, not a parameter
            module.__class__ = (_Embedding if isinstance(module, nn.QuantizedEmbedding) else
                                _Head if path == "lm_head" else _Linear)
            if gpu and module["scales"].dtype != dtype:
                module.update({k: module[k].astype(dtype) for k in ("scales", "biases")})
