"""Load and run a spec'd model with mlx-lm's model classes (Metal on Apple silicon, CPU or CUDA elsewhere)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx import nn

from dn.spec import ModelSpec, weight_files

NAME = "mlx"
# DN_MLX_DEVICE=cpu|gpu pins the device (CI runs the suite on the CPU of hosted macOS runners).
if os.environ.get("DN_MLX_DEVICE") in ("cpu", "gpu"):
    mx.set_default_device(mx.cpu if os.environ["DN_MLX_DEVICE"] == "cpu" else mx.gpu)
_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def is_available() -> bool:
    try:
        mx.array(1) + 1
    except Exception:  # a Linux `pip install mlx` without [cpu]/[cuda] cannot load libmlx
        return False
    return True


def device_name() -> str:
    dev = mx.default_device()
    if dev.type == mx.gpu:
        if mx.metal.is_available():
            return f"metal:{mx.device_info().get('device_name', 'gpu')}"
        return "gpu"
    return "cpu"


def _skeleton(spec: ModelSpec):
    from mlx_lm.utils import _get_classes

    config = spec.architecture.to_mlx_config()
    model_class, args_class = _get_classes(config)
    return model_class(args_class.from_dict(config))


def load(model_dir: Path, spec: ModelSpec, dtype: str = "float32"):
    model = _skeleton(spec)
    weights = {}
    for f in weight_files(model_dir):
        weights.update(mx.load(str(f)))
    weights = model.sanitize(weights) if hasattr(model, "sanitize") else weights
    if spec.quant is not None:  # quantized layers swapped in before loading: no dense weight is ever built
        from dn.quant import layout
        from dn_mlx import quant

        quant.quantize_model(model, spec.quant | layout(spec.quant, weights))
    if spec.codec is None:
        model.load_weights(list(weights.items()), strict=True)
        model.set_dtype(_DTYPES[dtype])
    else:
        from dn_mlx import codec

        known = dict(nn.utils.tree_flatten(model.parameters()))
        model.load_weights([(k, v) for k, v in weights.items() if k in known], strict=False)
        model.set_dtype(_DTYPES[dtype])
        codec.attach(model, model_dir, spec)
    if spec.sparse is not None:
        from dn_mlx import sparse

        sparse.attach(model, model_dir, spec)
    mx.eval(model.parameters())
    model.eval()
    model.dn_dtype = dtype
    return model


def make_cache(model):
    from mlx_lm.models.cache import make_prompt_cache

    return make_prompt_cache(model)


def logits(model, tokens: np.ndarray, cache=None, last_only: bool = False) -> np.ndarray:
    out = model(mx.array(np.asarray(tokens)), cache=cache)
    if last_only:
        out = out[:, -1:]
    return np.array(out.astype(mx.float32))


def token_nll(model, tokens: np.ndarray) -> np.ndarray:
    ids = mx.array(np.asarray(tokens))
    out = model(ids[:, :-1]).astype(mx.float32)
    target = mx.take_along_axis(out, ids[:, 1:, None], axis=-1)[..., 0]
    nll = mx.logsumexp(out, axis=-1) - target
    return np.array(nll).astype(np.float64)


class _Tap:
    """Stands in for a layer inside LlamaModel.__call__ and records its output."""

    def __init__(self, layer, sink: list):
        self.layer, self.sink = layer, sink

    def __getattr__(self, name):  # e.g. `use_sliding`, read by the model loop
        return getattr(self.layer, name)

    def __call__(self, *args, **kwargs):
        h = self.layer(*args, **kwargs)
        self.sink.append(h)
        return h


def hidden_states(model, tokens: np.ndarray) -> list[np.ndarray]:
    ids = mx.array(np.asarray(tokens))
    inner = model.model
    sink = [inner.embed_tokens(ids)]
    layers = list(inner.layers)
    inner.layers[:] = [_Tap(layer, sink) for layer in layers]
    try:
        model(ids)
    finally:
        inner.layers[:] = layers
    return [np.array(h[0].astype(mx.float32)) for h in sink]


def import_model_code(spec: ModelSpec) -> None:
    """Import what load() runs for spec (mlx-lm's model module, dn's codec and sparse modules), so that a
    measured load counts weights, not code."""
    from mlx_lm.utils import _get_classes

    _get_classes(spec.architecture.to_mlx_config())
    for name, section in (("codec", spec.codec), ("sparse", spec.sparse), ("quant", spec.quant)):
        if section is not None:
            importlib.import_module(f"dn_mlx.{name}")


def memory_stats(reset_peak: bool = False) -> dict:
    """MLX's allocator (Metal buffers, or malloc on the CPU build; both meaningful): bytes of live arrays now
    and at the peak (then reset when asked)."""
    stats = {"kind": "mlx active", "active_bytes": int(mx.get_active_memory()),
             "peak_kind": "mlx peak", "peak_bytes": int(mx.get_peak_memory())}
    if reset_peak:
        mx.reset_peak_memory()
    return stats


def free(model) -> None:
    """Give cached allocator memory back once the caller has dropped its model references."""
    mx.clear_cache()
