"""Affine group-wise quantized weights (mlx-lm's format, dn/quant.py) on MLX: mlx's own quantized layers.

dn_torch/quant.py has the same public functions; a test checks the two modules match, name for name."""

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
    return mx.dequantize(module.weight[idx], module.scales[idx], module.biases[idx], group_size=module.group_size,
                         bits=module.bits, mode=module.mode)
