"""Load and run a spec'd model with transformers' model classes on torch (CPU, CUDA, ROCm, MPS)."""

from __future__ import annotations

import contextlib
import functools
import inspect
from pathlib import Path

import numpy as np
import torch

from dn.core import tensors
from dn.core.errors import DnError
from dn.formats.quant import layout
from dn.model import store
from dn.model.spec import ModelSpec, weight_files
from dn_torch import _decode, codec, gguf, ops, pipeline, quant, resident, sparse
from dn_torch.ops import DTYPES
from dn_torch.ops import device as _device

NAME = "torch"


def is_available() -> bool:
    return True


def device_name() -> str:
    dev = _device()
    if dev.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(dev)}"
    return dev.type


def _config(spec: ModelSpec):
    from transformers import AutoConfig  # heavy: imported on first use

    cfg = spec.architecture.to_hf_config()
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def _model_class(spec: ModelSpec):
    import transformers  # heavy: imported on first use

    return getattr(transformers, _config(spec).architectures[0])


def _meta_model(spec: ModelSpec):
    """(model, config): transformers' model for spec with every weight on meta, nothing allocated yet."""
    config = _config(spec)
    with torch.device("meta"):
        model = _model_class(spec)(config)
    return model, config


def load(model_dir: Path, spec: ModelSpec, dtype: str = "float32", residency=None, stage=None):
    """residency: a dn.runtime.residency.Runtime: the MLPs are not read from the folder but held under its plan.
    stage: a dn.runtime.pipeline.Stage: only its layers are read (dn_torch.pipeline.cut)."""
    from transformers.utils import logging  # heavy: imported on first use

    logging.disable_progress_bar()
    torch_dtype = DTYPES[dtype]
    if spec.quant is not None:
        model = _load_quantized(model_dir, spec, dtype, residency is not None, stage)
    else:
        model = _load_plain(model_dir, spec, dtype, residency is not None, stage)
    if residency is not None:
        residency.install(model, _sparse_layers(model_dir, spec, residency, torch_dtype))
    elif spec.sparse is not None:
        sparse.attach(model, model_dir, spec)
    _decode.fuse(model)
    model.eval()
    model.dn_dtype = dtype
    return model


def _sparse_layers(model_dir: Path, spec: ModelSpec, runtime, dtype: torch.dtype):
    """Sparse residency: each layer's router and prior, without its neurons (a SparseMLP with no neurons)."""
    if runtime.plan.mode != "sparse":
        return None
    return sparse.routers(model_dir, spec, dtype)


def _without_mlps(model) -> None:
    """Residency: the MLPs are held by dn.runtime.residency, not read from the folder (their tensors find no slot)."""
    for layer in model.model.layers:
        layer.mlp = resident.ResidentModule()


def _load_plain(model_dir: Path, spec: ModelSpec, dtype: str, resident: bool = False, stage=None):
    """A dense, lossless or native GGUF folder, straight into its final form: the skeleton stays on meta and each
    stored tensor is read from the file (dn.core.tensors, each file once) into its own parameter at dtype, converted
    a chunk of rows at a time (no copy of the checkpoint, mapped or read, exists beside the model); a GGUF folder's
    quantized modules hold their blocks as stored (dn_torch.gguf); a sparse
    folder's dense MLPs are read straight into their bundles (dn_torch.sparse.lay_out_bundled); coded
    projections are swapped in after, one layer at a time (dn_torch.codec.attach). Same values as
    from_pretrained: each tensor converted as Tensor.to does."""
    model, config = _meta_model(spec)
    if resident:
        _without_mlps(model)
    scale = None
    if spec.gguf is not None:  # a native GGUF folder: its quantized modules hold the blocks (dn_torch.gguf)
        scale = _plain_scaled_embedding(model)
        held = {k: v for k, v in spec.gguf.items() if not (resident and ".mlp." in k)}  # residency holds MLPs
        gguf.swap(model, held, DTYPES[dtype])
    if stage is not None:  # a pipeline rank: other ranks' tensors find no slot, so are never read
        pipeline.cut(model, stage)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()  # tie_weights sets it
    shared = stage is not None and stage.vocab_split and tied  # a rank's rows of the tied head, filled here
    shared = shared and stage.head_rows(config.vocab_size, True) is not None
    mapped = (store.mapped(spec) | (stage.lookup(spec) if stage else set())) if _device().type == "cpu" else set()
    # a token reads one row: the rest stays on disk
    into = {}  # stored name -> the tensor it is read into, laid out before reading
    if spec.sparse is not None and spec.codec is None and not resident:
        for i, layer in enumerate(model.model.layers):
            if getattr(layer, "elsewhere", False):  # another pipeline rank's
                continue
            views = sparse.lay_out_bundled(layer.mlp, DTYPES[dtype], _device())
            into |= {f"model.layers.{i}.mlp.{k}": v for k, v in views.items()}
    for path in weight_files(model_dir):
        with tensors.File(path) as f:
            _check_dtypes(f)
            for name in f.header:
                if shared and name == "model.embed_tokens.weight":
                    _fill_head(model, stage, f.mapped(name))
                if name in into:
                    _copy_into(into.pop(name), f, name, dtype)
                    continue
                module, want = (None, None) if name in tied else _slot(model, f, name)
                if want is not None and name in mapped:
                    rows = f.mapped(name)
                    module._buffers[name.rpartition(".")[2]] = torch.from_numpy(rows)
                    module.mapping = rows._mmap  # its pages leave the process after each lookup
                elif want is not None:
                    _place(module, f, name, dtype)
    if into:
        raise DnError(f"{model_dir}: weights lack tensor {min(into)}")
    _rotary(model, config)
    if scale is not None:
        _scale_output(model.model.embed_tokens, scale)
    if spec.codec is not None:
        codec.attach(model, model_dir, spec)
    if tied and not shared:
        model.tie_weights()
    _check_loaded(model, model_dir)
    return model


def _fill_head(model, stage, stored: np.ndarray) -> None:
    """The tied embedding's stored blocks (mapped, [vocab, row bytes]) -> this rank's rows of the lm_head, a copy."""
    lo, hi = stage.head_rows(model.config.vocab_size, True)
    model.lm_head._buffers["weight"] = torch.from_numpy(np.array(stored[lo:hi])).to(_device())


def _rotary(model, config) -> None:
    """Non-persistent buffers (rotary frequencies, Gemma's embedding scale) are never stored: rebuilt, in float32
    as from_pretrained leaves them."""
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(_device())
    emb = model.model.embed_tokens
    if "embed_scale" in emb._buffers:
        emb._buffers["embed_scale"] = torch.tensor(_embed_scale(config.hidden_size), device=_device())


def _plain_scaled_embedding(model) -> float | None:
    """Gemma's embedding module scales its output itself, and dn_torch.quant swaps only plain Embeddings: a plain
    one (on meta) takes its place; the caller hooks the scale onto whatever is then in its place (_scale_output).
    Returns the scale (None for an unscaled embedding)."""
    emb = model.model.embed_tokens
    if "embed_scale" not in emb._buffers:
        return None
    with torch.device("meta"):
        model.model.embed_tokens = torch.nn.Embedding(emb.num_embeddings, emb.embedding_dim, emb.padding_idx)
    return _embed_scale(model.config.hidden_size)


def _scale_output(module, scale: float) -> None:
    """Multiply module's output by scale at the output's dtype, as Gemma's embedding module does."""
    s = torch.tensor(scale)
    module.register_forward_hook(lambda _m, _args, out: out * s.to(out.dtype))


def _embed_scale(hidden: int) -> float:
    """Gemma's embedding scale sqrt(hidden) rounded to bfloat16, as mlx-lm computes it at every dtype (and
    transformers at bfloat16: 25.25, not 25.298, for 640): the model was trained at bfloat16, and in float32
    the two stacks then compute the same model."""
    return float(torch.tensor(hidden ** 0.5, dtype=torch.bfloat16))


def _load_quantized(model_dir: Path, spec: ModelSpec, dtype: str, resident: bool = False, stage=None):
    """An mlx-lm quantized folder: the skeleton stays on meta, its quantized modules are swapped in, and each
    stored tensor is read from the file (dn.core.tensors, each file once) straight into its final tensor; packed
    weights last, a chunk of rows at a time into the layout they compute in (no dense, nor second packed, copy
    of a matrix ever exists)."""
    model, config = _meta_model(spec)
    if resident:
        _without_mlps(model)
    scale = _plain_scaled_embedding(model)
    # mlx-lm's loader rule: a module is quantized iff its scales are stored
    quant.quantize_model(model, {**spec.quant, **layout(spec.quant, [t.name for t in spec.tensors])})
    if stage is not None:  # as in _load_plain
        pipeline.cut(model, stage)
    packed = []
    with contextlib.ExitStack() as files:
        for path in weight_files(model_dir):
            f = files.enter_context(tensors.File(path))
            _check_dtypes(f)
            for name in f.header:
                module, want = _slot(model, f, name)
                if isinstance(module, (quant.QuantizedLinear, quant.QuantizedEmbedding)) and want is module.weight:
                    packed.append((module, f, name))
                elif want is not None:
                    _place(module, f, name, dtype)
        _rotary(model, config)
        if scale is not None:
            _scale_output(model.model.embed_tokens, scale)
        _check_loaded(model, model_dir, skip={id(m.weight) for m, _, _ in packed})
        for module, f, name in packed:
            module.fill(functools.partial(_read, f, name, None), DTYPES[dtype])
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    _check_loaded(model, model_dir)
    return model


def _check_loaded(model, model_dir: Path, skip=frozenset()) -> None:
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta and id(t) not in skip:
            raise DnError(f"{model_dir}: weights lack tensor {name}")


def _check_dtypes(f: tensors.File) -> None:
    """Every tensor of a file is in DTYPES, whether or not the model has a place for it, checked as it opens."""
    for name in f.header:
        if f.dtype(name) not in DTYPES:
            raise DnError(f"{f.path}: tensor {name} has unsupported dtype {f.header[name]['dtype']}")


def _slot(model, f: tensors.File, name: str):
    """(module, the parameter or buffer the skeleton holds for a stored tensor), checked against it; (None,
    None) for a tensor the model has no place for."""
    path, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None, None
    want = module._parameters.get(attr) if attr in module._parameters else module._buffers.get(attr)
    stored = DTYPES[f.dtype(name)]
    if want is not None and (list(want.shape) != f.shape(name)
                             or (not want.is_floating_point() and want.dtype != stored)):
        raise DnError(f"tensor {name} is {stored} {f.shape(name)}, the model expects {want.dtype} {list(want.shape)}")
    return module, want


def _place(module, f: tensors.File, name: str, dtype: str) -> None:
    """Read a stored tensor into its place: quantized modules' scales, biases and bias as stored (fill
    converts them), float parameters at dtype."""
    attr = name.rpartition(".")[2]
    if attr in module._parameters:
        module._parameters[attr] = torch.nn.Parameter(_read(f, name, dtype), requires_grad=False)
    elif (isinstance(module, (quant.QuantizedLinear, quant.QuantizedEmbedding))
          or not DTYPES[f.dtype(name)].is_floating_point):
        module._buffers[attr] = _read(f, name)
    else:
        module._buffers[attr] = _read(f, name, dtype)


def _read(f: tensors.File, name: str, dtype: str | None = None, r0: int = 0, r1: int | None = None) -> torch.Tensor:
    """Rows [r0, r1) of a stored tensor (all of it by default) on the device, as stored or at dtype (converted by
    dn.core.tensors into the memory the tensor keeps, a chunk of rows at a time, as Tensor.to converts)."""
    return ops._tensor(f.read(name, dtype, r0, r1)).to(_device())


def _copy_into(out: torch.Tensor, f: tensors.File, name: str, dtype: str) -> None:
    """Copy a stored tensor into out (any strides: a view of a bundle) as dn.core.tensors hands it over at dtype,
    a chunk of rows at a time."""
    if list(out.shape) != f.shape(name):
        raise DnError(f"tensor {name} is {DTYPES[f.dtype(name)]} {f.shape(name)}, the model expects "
                      f"{out.dtype} {list(out.shape)}")
    for r0, a in f.chunks(name, dtype):
        out[r0:r0 + len(a)].copy_(ops._tensor(a))


def make_cache(model, max_kv_size: int | None = None, kv_bits: int | None = None):
    """transformers' DynamicCache, its full-attention layers grown in place (dn_torch/_decode.py: no copy of the
    cache each token, and the lean decode step runs on it); under max_kv_size each layer keeps max_kv_size tokens
    as mlx-lm's rotating cache does (the first 4 and the latest); under kv_bits, transformers' QuantizedCache
    (needs optimum-quanto or hqq)."""
    from transformers import DynamicCache  # heavy: imported on first use

    if kv_bits is not None:
        if max_kv_size is not None:
            raise DnError("--kv-bits and --max-kv-size do not combine (no quantized sliding-window cache)")
        return _quantized_cache(model, kv_bits)
    cache = DynamicCache(config=model.config)
    if max_kv_size is None:
        from transformers.cache_utils import DynamicLayer  # heavy: imported on first use

        grown = _decode.grown_layer()
        cache.layers = [grown() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    else:
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer  # heavy: imported on first use

        layers = []
        for layer in cache.layers:
            if type(layer) is DynamicSlidingWindowLayer and layer.sliding_window <= max_kv_size:
                layers.append(layer)  # the model's own window is already within the bound
            elif type(layer) is DynamicLayer:
                layers.append(_rotating_layer_class()(max_kv_size, keep=4))
            else:
                raise DnError(f"--max-kv-size: this model's {type(layer).__name__} cache layers cannot be bounded "
                              "on torch")
        cache.layers = layers
    return cache


@functools.cache
def _rotating_layer_class():
    from transformers.cache_utils import DynamicLayer  # heavy: imported on first use

    class RotatingLayer(DynamicLayer):
        """mlx-lm's RotatingKVCache on a transformers cache layer: after each update it keeps the first `keep`
        tokens (attention sinks) and the latest ones, max_size - 1 in all, so the next token attends to max_size
        (the tokens of one update attend to all that is kept before them). Keys are cached after rope, so the
        kept tokens keep their positions; the mask sees the kept tokens as the ones just before the query."""

        def __init__(self, max_size: int, keep: int = 0):
            super().__init__()
            self.max_size, self.keep, self.cumulative_length = max_size, min(keep, max_size - 1), 0

        def update(self, key_states, value_states, *args, **kwargs):
            keys, values = super().update(key_states, value_states)
            self.cumulative_length += key_states.shape[-2]
            drop = keys.shape[-2] - (self.max_size - 1)
            if drop > 0:
                k = self.keep
                self.keys = torch.cat([keys[..., :k, :], keys[..., k + drop:, :]], dim=-2)
                self.values = torch.cat([values[..., :k, :], values[..., k + drop:, :]], dim=-2)
            return keys, values

        def get_seq_length(self) -> int:
            return self.cumulative_length

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            stored = 0 if self.keys is None else self.keys.shape[-2]
            return stored + query_length, self.cumulative_length - stored

        def get_max_length(self) -> int:
            return self.max_size

    return RotatingLayer


def _quantized_cache(model, kv_bits: int):
    from transformers import QuantizedCache  # heavy: imported on first use
    from transformers.utils import is_hqq_available, is_optimum_quanto_available

    if is_optimum_quanto_available() and kv_bits in (2, 4):
        return QuantizedCache("quanto", model.config, nbits=kv_bits)
    if is_hqq_available() and kv_bits in (1, 2, 3, 4, 8):
        return QuantizedCache("hqq", model.config, nbits=kv_bits)
    raise DnError(f"--kv-bits {kv_bits} on torch needs transformers' quantized cache backend: "
                  "pip install optimum-quanto (2 or 4 bits) or hqq (2, 3, 4 or 8 bits)")


@functools.cache
def _cache_kwarg(model_class) -> str:
    """The forward's name for the cache: `cache` since transformers 5.x renamed it (`past_key_values` is
    deprecated, removed in 5.40), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


@torch.inference_mode()
def logits(model, tokens: np.ndarray, cache=None, last_only: bool = False) -> np.ndarray:
    ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long, device=_device())
    if ids.shape[1] == 1 and cache is not None and _decode.runs(model, cache):
        return _decode.step(model, ids, cache).float().cpu().numpy()
    out = model(input_ids=ids, use_cache=cache is not None, logits_to_keep=1 if last_only else 0,
                **{_cache_kwarg(type(model)): cache})
    return out.logits.float().cpu().numpy()


@torch.inference_mode()
def token_nll(model, tokens: np.ndarray) -> np.ndarray:
    ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long, device=_device())
    out = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    logp = torch.log_softmax(out, dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
    return nll.double().cpu().numpy()


@torch.inference_mode()
def hidden_states(model, tokens: np.ndarray) -> list[np.ndarray]:
    captured = []

    def tap(_module, _inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        captured.append(h[0].float().cpu().numpy())

    inner = model.model
    hooks = [inner.embed_tokens.register_forward_hook(tap)]
    hooks += [layer.register_forward_hook(tap) for layer in inner.layers]
    try:
        ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long, device=_device())
        model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return captured


def import_model_code(spec: ModelSpec) -> None:
    """Import what load() runs for spec, so that a measured load counts weights, not code: transformers imports
    a modeling module on first use (dn_torch's own modules are imported with the package)."""
    _model_class(spec)


def memory_stats(reset_peak: bool = False) -> dict | None:
    """CUDA's allocator: bytes of live tensors now and at the peak (then reset when asked). None on the CPU,
    which has no device allocator (dn.runtime.memory measures the process), and on MPS (not wired up)."""
    if _device().type != "cuda":
        return None
    stats = {"kind": "cuda allocated", "active_bytes": int(torch.cuda.memory_allocated()),
             "peak_kind": "cuda max allocated", "peak_bytes": int(torch.cuda.max_memory_allocated())}
    if reset_peak:
        torch.cuda.reset_peak_memory_stats()
    return stats


def free(model) -> None:
    """Give cached allocator memory back once the caller has dropped its model references."""
    if _device().type == "cuda":
        torch.cuda.empty_cache()
