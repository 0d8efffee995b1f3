"""Affine group-wise quantized weights (mlx-lm's format, dn/formats/quant.py) on MLX: mlx's own quantized layers.

affine_matmul, quantize_model and rows as dn_torch/quant.py has them; _compute_at for the loader (dn_mlx/model.py)."""

from __future__ import annotations

import mlx.core as mx
from mlx import nn


def affine_matmul(x: mx.array, packed: mx.array, scales: mx.array, biases: mx.array, bits: int,
                  group_size: int) -> mx.array:
    """x [..., k] @ W.T for W [n, k] stored quantized (packed uint32 [n, k*bits/32], scales/biases [n, k/gs])."""
    return mx.quantized_matmul(x, packed, scales, biases, transpose=True, group_size=group_size, bits=bits)


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


def rows(module: nn.Module, idx) -> mx.array:
    """Dense rows W[idx] of a (quantized) Linear or Embedding at its compute dtype, dequantizing only them."""
    idx = mx.array(idx)
    if not isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return module.weight[idx]
    dt = getattr(module, "_compute", module.scales.dtype)  # scales held 16-bit under a 32-bit compute dtype
    return mx.dequantize(module.weight[idx], module.scales[idx].astype(dt), module.biases[idx].astype(dt),
                         group_size=module.group_size, bits=module.bits, mode=module.mode)


class _Embedding(nn.QuantizedEmbedding):
    """Looks rows up at the compute dtype, whatever dtype its scales are held in."""

    def __call__(self, x: mx.array) -> mx.array:
        s, b = (self[k][x].astype(self._compute) for k in ("scales", "biases"))  # dequantized in that dtype
        return mx.dequantize(self["weight"][x], s, b, group_size=self.group_size, bits=self.bits, mode=self.mode)


def _compute_at(model: nn.Module, dtype) -> None:
    """Under a 32-bit compute dtype the loader holds 16-bit stored scales and biases as stored
    (dn.formats.quant.scale_dtype: exact in 32-bit arithmetic, half the bytes), as torch does: quantized modules
    then dequantize rows, and quantized embeddings look them up, at the compute dtype."""
    if dtype.size <= 2:
        return
    for _, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            object.__setattr__(module, "_compute", dtype)  # a plain attribute, not a parameter
        if type(module) is nn.QuantizedEmbedding:
            module.__class__ = _Embedding
