"""Load and run a spec'd model with mlx-lm's model classes (Metal on Apple silicon, CPU or CUDA elsewhere)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx import nn

from dn.core import tensors
from dn.core.errors import DnError
from dn.formats import gguf_blocks
from dn.formats.quant import layout, scale_dtype
from dn.model.spec import ModelSpec, weight_files
from dn_mlx import codec, gguf, ops, pipeline, quant, resident, sparse
from dn_mlx.ops import DTYPES

NAME = "mlx"


def _pin_device(name: str) -> None:
    """DN_MLX_DEVICE=cpu|gpu pins the device (CI runs the suite on the CPU of hosted macOS runners); anything else,
    or a GPU this MLX lacks, is one line here, not mlx's error later."""
    if name not in ("cpu", "gpu"):
        raise DnError(f"DN_MLX_DEVICE={name}: expected cpu or gpu")
    try:
        mx.set_default_device(getattr(mx, name))
    except (ValueError, RuntimeError):  # "Cannot set gpu device without gpu backend"
        raise DnError(f"DN_MLX_DEVICE={name}: this MLX ({mx.__version__}) has no {name} here (a GPU is Metal or "
                      "mlx[cuda])") from None


if os.environ.get("DN_MLX_DEVICE"):
    _pin_device(os.environ["DN_MLX_DEVICE"])


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
    from mlx_lm.utils import _get_classes  # mlx-lm: imported on first use

    config = spec.architecture.to_mlx_config()
    model_class, args_class = _get_classes(config)
    return model_class(args_class.from_dict(config))


def load(model_dir: Path, spec: ModelSpec, dtype: str = "float32", residency=None, stage=None):
    """mlx-lm's model for spec, each stored tensor read once from its file (dn.core.tensors) at the dtype it is
    held in. residency: a dn.runtime.residency.Runtime: the MLPs are not read but held under its plan. stage: a
    dn.runtime.pipeline.Stage: only its tensors are read (dn_mlx.pipeline.cut)."""
    model = _skeleton(spec)
    with contextlib.ExitStack() as files:
        stored = tensors.Shards.open(files, weight_files(model_dir))  # each tensor read from its file in its turn
        stored = model.sanitize(stored) if hasattr(model, "sanitize") else stored  # the families' only drop keys
        if stage is not None:  # a pipeline rank: other ranks' tensors are never read
            pipeline.cut(model, stage)
            n, tied = spec.architecture.num_hidden_layers, spec.architecture.tie_word_embeddings
            stored = {k: f for k, f in stored.items() if stage.keeps(k, n, tied)}
        bad = next((k for k, f in stored.items() if f.dtype(k) not in DTYPES), None)  # each tensor checked once
        if bad is not None:
            raise DnError(f"{stored[bad].path}: tensor {bad} has unsupported dtype {stored[bad].header[bad]['dtype']}")
        if residency is not None:
            for layer in model.model.layers:
                layer.mlp = resident.ResidentModule()
            stored = {k: f for k, f in stored.items() if ".mlp." not in k}
        if spec.gguf is not None:  # a GGUF's blocks: quantized modules or the blocks as they are (dn_mlx.gguf)
            gguf.quantize_model(model, spec.gguf, dtype)
            shared = _shared_head(stage, spec, stored, dtype)  # before the lookup's mapping takes the name
            for name in (stage.lookup(spec) if stage else set()) & stored.keys():  # only looked up: mapped
                f, kind = stored.pop(name), spec.gguf[name.removesuffix(".weight")]
                model.model.embed_tokens = gguf.MappedEmbedding(f.mapped(name), kind, dtype)
            model.load_weights([a for k, f in stored.items() for a in _gguf(f, k, spec.gguf, dtype)], strict=True)
            quant._compute_at(model, DTYPES[dtype])
            if shared is not None:
                model.dn_head = shared
        elif spec.quant is not None:  # quantized layers swapped in before loading: no dense weight is ever built
            quant.quantize_model(model, spec.quant | layout(spec.quant, stored))
            model.load_weights([(k, _read(f, k, _held(f, k, dtype))) for k, f in stored.items()], strict=True)
            quant._compute_at(model, DTYPES[dtype])
        else:
            _load_plain(model, model_dir, spec, stored, dtype)
    if residency is not None:
        sparse_layers = None
        if residency.plan.mode == "sparse":
            sparse_layers = sparse.routers(model_dir, spec, DTYPES[dtype])
        residency.install(model, sparse_layers)
    elif spec.sparse is not None:
        sparse.attach(model, model_dir, spec)
    mx.eval(model.parameters())
    model.eval()
    model.dn_dtype = dtype
    return model


def _shared_head(stage, spec: ModelSpec, stored: dict, dtype: str):
    """A pipeline rank's rows of a tied GGUF lm_head shared between the first and last rank (Stage.vocab_split,
    dn_mlx.pipeline.head_part), read from the mapped blocks; the embedding's name leaves stored where the rank
    holds no embedding of its own."""
    name, a = "model.embed_tokens.weight", spec.architecture
    rows = stage.head_rows(a.vocab_size, bool(a.tie_word_embeddings)) if stage and stage.vocab_split else None
    if rows is None or name not in stored:
        return None
    f = stored[name] if stage.holds_embedding(True) or stage.first else stored.pop(name)
    return _head_part(f.mapped(name), rows, spec.gguf[name.removesuffix(".weight")], dtype)


def _head_part(raw: np.ndarray, rows: tuple[int, int], kind: str, dtype: str) -> nn.Module:
    """Rows [lo, hi) of a tied GGUF embedding (its mapped blocks, raw) as a head of their own: float32 logits, the
    whole table's as_linear's for those rows bit for bit (scales held at the whole table's dtype, gguf._side)."""
    holder = nn.Module()
    cols = gguf_blocks.dense_shape(raw.shape, kind)[1]
    holder.lm_head = nn.Linear(cols, rows[1] - rows[0], bias=False)  # lazy: replaced before it is evaluated
    gguf.quantize_model(holder, {"lm_head": kind}, dtype)
    side = None if kind in gguf.BLOCKS or dtype == "float32" else gguf._side(raw, kind)
    holder.load_weights(gguf.arrays("lm_head.weight", np.ascontiguousarray(raw[rows[0]:rows[1]]), kind, dtype, side))
    quant._compute_at(holder, DTYPES[dtype])
    return holder.lm_head


def _held(f: tensors.File, name: str, dtype: str) -> str | None:
    """The dtype a stored tensor is held in: floats at the compute dtype, quantized modules' scales and biases
    as dn.formats.quant.scale_dtype says, the rest (packed codes) as stored (None)."""
    stored = f.dtype(name)
    if stored in tensors.NUMPY:
        return scale_dtype(stored, dtype) if name.endswith((".scales", ".biases")) else dtype


def _gguf(f: tensors.File, name: str, types: dict, dtype: str) -> list[tuple[str, mx.array]]:
    """A native GGUF folder's stored tensor -> the arrays its module holds (dn_mlx.gguf), a float one as _held says."""
    kind = types.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
    return gguf.arrays(name, f.read(name), kind, dtype) if kind else [(name, _read(f, name, _held(f, name, dtype)))]


def _load_plain(model, model_dir: Path, spec: ModelSpec, stored: dict, dtype: str) -> None:
    """A dense or lossless folder, straight into its final form: the peak is the model plus about one layer.
    Lazy placeholders (never evaluated) check names and shapes against the skeleton; each stored tensor is then
    read from its file (stored: name -> dn.core.tensors.File) in its turn, outside the decoder layers first,
    then layer by layer, at dtype and evaluated (_read), so no stored copy of more than a chunk exists beside the
    model. A sparse folder's dense MLPs are built as their bundles (dn_mlx.sparse.lay_out_bundled); coded
    projections are swapped in before anything is read (dn_mlx.codec.attach)."""
    if spec.codec is not None:  # the coded projections are stored elsewhere: load what the model has a place for
        known = dict(nn.utils.tree_flatten(model.parameters()))
        stored = {k: f for k, f in stored.items() if k in known}
    model.load_weights([(k, mx.zeros(f.shape(k), DTYPES[f.dtype(k)])) for k, f in stored.items()],
                       strict=spec.codec is None)  # names and shapes checked; nothing read
    model.set_dtype(DTYPES[dtype])
    if spec.codec is not None:  # before reading: the skeleton's own (lazy) projections are never built
        codec.attach(model, model_dir, spec)
    read = lambda k: _read(stored[k], k, _held(stored[k], k, dtype))
    outside = [k for k in stored if not k.startswith("model.layers.")]  # the embedding, norm, an untied head
    model.load_weights([(k, read(k)) for k in outside], strict=False)
    held = [i for i, layer in enumerate(model.model.layers) if not getattr(layer, "elsewhere", False)]  # a rank's
    bundle = spec.sparse is not None and spec.codec is None and not isinstance(model.model.layers[held[0]].mlp,
                                                                                 resident.ResidentModule)
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}."
        layer.load_weights([(k.removeprefix(prefix), read(k)) for k in stored if k.startswith(prefix)], strict=False)
        if bundle and i in held:
            sparse.lay_out_bundled(layer.mlp, DTYPES[dtype])
        mx.clear_cache()  # as in _read
        mx.eval(layer.parameters())
    mx.eval(model.parameters())


def _read(f: tensors.File, name: str, dtype: str | None = None) -> mx.array:
    """A stored tensor as stored or at dtype, evaluated, from plain reads of its file. One that changes dtype is
    converted (dn.core.tensors, as astype converts) a chunk of rows at a time into the array it ends in: each
    slice update is evaluated before the next read and reuses the array's buffer."""
    # Freed buffers (stored copies) are released, not handed out again to a smaller array that would then hold,
    # and be counted for, more than its bytes.
    mx.clear_cache()
    held, shape = dtype or f.dtype(name), f.shape(name)
    if held == f.dtype(name) or not shape:
        out = ops._array(f.read(name, held))
    else:
        out = mx.zeros(shape, DTYPES[held])
        for r0, a in f.chunks(name, held):
            out[r0:r0 + len(a)] = ops._array(a)
            mx.eval(out)
    mx.eval(out)
    return out


def make_cache(model, max_kv_size: int | None = None, kv_bits: int | None = None):
    """mlx-lm's cache for the model; under max_kv_size each layer a RotatingKVCache (as mlx-lm's generate: the
    first 4 tokens and the last ones, max_kv_size in all); under kv_bits a QuantizedKVCache (groups of 64)."""
    from mlx_lm.models import cache as c  # mlx-lm: imported on first use

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
    tokens = np.asarray(tokens)
    if last_only and cache is not None and tokens.shape[1] > 1:  # as mlx-lm's prefill: only the cache of all but
        model(mx.array(tokens[:, :-1]), cache=cache)  # the last token is evaluated, never their [B, L, V] logits
        mx.eval([c.state for c in cache])
        tokens = tokens[:, -1:]
    out = model(mx.array(tokens), cache=cache)
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
    """Import mlx-lm's model module for spec (dn_mlx's own come with the package), so that a measured load counts
    weights, not code."""
    from mlx_lm.utils import _get_classes  # mlx-lm: imported on first use

    _get_classes(spec.architecture.to_mlx_config())


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
