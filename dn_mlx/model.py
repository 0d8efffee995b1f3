"""Load and run a spec'd model with mlx-lm's model classes (Metal on Apple silicon, CPU or CUDA elsewhere)."""

from __future__ import annotations

import importlib
import math
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx import nn

from dn.model.spec import ModelSpec, weight_files

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


def load(model_dir: Path, spec: ModelSpec, dtype: str = "float32", residency=None):
    """residency: a dn.runtime.residency.Runtime: the MLPs are not read from the folder but held under its plan."""
    model = _skeleton(spec)
    weights = {}
    for f in weight_files(model_dir):
        weights.update(mx.load(str(f)))
    weights = model.sanitize(weights) if hasattr(model, "sanitize") else weights
    if residency is not None:
        from dn_mlx import resident

        for layer in model.model.layers:
            layer.mlp = resident.Placeholder()
        for k in [k for k in weights if ".mlp." in k]:
            del weights[k]
    if spec.quant is not None:  # quantized layers swapped in before loading: no dense weight is ever built
        from dn.formats.quant import layout
        from dn_mlx import quant

        quant.quantize_model(model, spec.quant | layout(spec.quant, weights))
        model.load_weights(list(weights.items()), strict=True)
        model.set_dtype(_DTYPES[dtype])
    else:
        _load_plain(model, model_dir, spec, weights, _DTYPES[dtype])
    if spec.quant is not None:
        from dn_mlx import quant

        quant._keep_stored_scales(model, weights, _DTYPES[dtype])
    if residency is not None:
        from dn_mlx import resident

        sparse_layers = None
        if residency.plan.mode == "sparse":
            from dn_mlx import sparse

            sparse_layers = sparse.routers(model_dir, spec, _DTYPES[dtype])
        resident.install(model, residency, sparse_layers)
    elif spec.sparse is not None:
        from dn_mlx import sparse

        sparse.attach(model, model_dir, spec)
    mx.eval(model.parameters())
    model.eval()
    model.dn_dtype = dtype
    return model


def _placeholder():
    from dn_mlx import resident

    return resident.Placeholder


_CHUNK_BYTES = 2 << 20  # of a stored tensor read at a time when it changes dtype
_STORED = {"BF16": mx.bfloat16, "F16": mx.float16, "F32": mx.float32}  # floating dtypes read by _read_as


def _load_plain(model, model_dir: Path, spec: ModelSpec, weights: dict, dtype) -> None:
    """A dense or lossless folder, straight into its final form: the peak is the model plus about one layer.
    mx.load's (lazy) arrays only check names and shapes against the skeleton; each stored tensor is then read
    from its file in its turn (plain reads: outside the decoder layers first, then layer by layer), cast to
    dtype and evaluated, a chunk of rows at a time when it changes dtype (_read_as), so no stored copy of more
    than a chunk exists beside the model. A sparse folder's dense MLPs are built as their bundles (dn_mlx.sparse.
    lay_out_bundled); coded projections are swapped in before anything is read (dn_mlx.codec.attach)."""
    from dn.core import tensors as safetensors_io

    if spec.codec is not None:  # the coded projections are stored elsewhere: load what the model has a place for
        known = dict(nn.utils.tree_flatten(model.parameters()))
        for k in [k for k in weights if k not in known]:
            del weights[k]
    stored = {}  # name -> (file, header entry, data offset) of the tensors read by _read_as
    for f in weight_files(model_dir):
        header, offset = safetensors_io.read_header(f)
        for name, info in header.items():
            a = weights.get(name)  # as stored: the families' sanitize only drops keys
            if (a is not None and info["dtype"] in _STORED and a.dtype == _STORED[info["dtype"]]
                    and list(a.shape) == info["shape"]):
                stored[name] = (f, info, offset)
    model.load_weights(list(weights.items()), strict=spec.codec is None)  # names and shapes checked; nothing read
    weights.clear()
    model.set_dtype(dtype)
    if spec.codec is not None:  # before reading: the skeleton's own (lazy) projections are never built
        from dn_mlx import codec

        codec.attach(model, model_dir, spec)
    outside = [k for k in stored if not k.startswith("model.layers.")]  # the embedding, norm, an untied head
    model.load_weights([(k, _read_as(*stored.pop(k), dtype)) for k in outside], strict=False)
    bundle = spec.sparse is not None and spec.codec is None and not isinstance(model.model.layers[0].mlp,
                                                                                 _placeholder())
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}."
        layer.load_weights([(k.removeprefix(prefix), _read_as(*stored.pop(k), dtype)) for k in list(stored)
                            if k.startswith(prefix)], strict=False)
        if bundle:
            from dn_mlx import sparse

            sparse.lay_out_bundled(layer.mlp, dtype)
        mx.clear_cache()  # as in _read_as
        mx.eval(layer.parameters())
    mx.eval(model.parameters())


def _read_as(path: Path, info: dict, offset: int, dtype) -> mx.array:
    """A stored floating tensor at dtype, evaluated, from plain reads of its file (dn.core.tensors.read_rows).
    One that changes dtype and is larger than _CHUNK_BYTES is filled a chunk of rows at a time: each slice
    update is evaluated before the next read and reuses the array's buffer. Same values as astype of the whole
    array."""
    from dn.core import tensors as safetensors_io

    stored, shape = _STORED[info["dtype"]], info["shape"]

    def rows(r0: int = 0, r1: int | None = None) -> mx.array:
        return mx.array(safetensors_io.read_rows(path, info, offset, r0, r1)).view(stored).astype(dtype)

    # Freed buffers (stored copies) are released, not handed out again to a smaller array that would then hold,
    # and be counted for, more than its bytes.
    mx.clear_cache()
    row = math.prod(shape[1:]) * stored.size
    if stored == dtype or not shape or shape[0] * row <= _CHUNK_BYTES:
        out = rows()
    else:
        out, step = mx.zeros(shape, dtype), max(1, _CHUNK_BYTES // row)
        for r0 in range(0, shape[0], step):
            out[r0:r0 + step] = rows(r0, r0 + step)
            mx.eval(out)
    mx.eval(out)
    return out


def make_cache(model, max_kv_size: int | None = None, kv_bits: int | None = None):
    """mlx-lm's cache for the model; under max_kv_size each layer a RotatingKVCache (as mlx-lm's generate: the
    first 4 tokens and the last ones, max_kv_size in all); under kv_bits a QuantizedKVCache (groups of 64)."""
    from mlx_lm.models import cache as c

    from dn.core.errors import DnError

    own = c.make_prompt_cache(model)  # a model's own make_cache ignores mlx-lm's max_kv_size: bounded here
    if max_kv_size is None and kv_bits is None:
        return own
    if kv_bits is not None and max_kv_size is not None:
        raise DnError("--kv-bits and --max-kv-size do not combine (mlx-lm has no quantized rotating cache)")
    out = []
    for layer in own:
        if type(layer) is c.RotatingKVCache and max_kv_size is not None:  # a sliding-window layer
            out.append(c.RotatingKVCache(min(layer.max_size, max_kv_size), keep=layer.keep))
        elif type(layer) is not c.KVCache:
            raise DnError(f"--max-kv-size/--kv-bits: this model's {type(layer).__name__} layers cannot be "
                          "bounded or quantized")
        elif max_kv_size is not None:
            out.append(c.RotatingKVCache(max_kv_size, keep=min(4, max_kv_size - 1)))
        else:
            out.append(c.QuantizedKVCache(group_size=64, bits=kv_bits))
    return out


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
    if getattr(model, "model_type", None) == "gemma3_text":  # Gemma3Model scales its embedding, as torch's module
        sink[0] = sink[0] * mx.array(inner.args.hidden_size ** 0.5, mx.bfloat16).astype(sink[0].dtype)
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
