"""Load and run a spec'd model with transformers' model classes on torch (CPU, CUDA, ROCm, MPS)."""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

import numpy as np
import torch

from dn.spec import ModelSpec, weight_files

NAME = "torch"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_available() -> bool:
    return True


def _device() -> torch.device:
    name = os.environ.get("DN_TORCH_DEVICE")
    if name:
        return torch.device(name)
    if torch.cuda.is_available():  # also true on ROCm builds
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def device_name() -> str:
    dev = _device()
    if dev.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(dev)}"
    return dev.type


def _config(spec: ModelSpec):
    from transformers import AutoConfig

    cfg = spec.architecture.to_hf_config()
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def _model_class(spec: ModelSpec):
    import transformers

    return getattr(transformers, _config(spec).architectures[0])


def _skeleton(spec: ModelSpec, dtype: torch.dtype):
    """The model with no weights loaded (meta tensors), for folders whose weights dn provides."""
    config = _config(spec)
    with torch.device("meta"):
        model = _model_class(spec)(config)
    model.to_empty(device=_device()).to(dtype)
    # Non-persistent buffers (rotary frequencies) were never loaded: rebuild them, in float32 as
    # from_pretrained leaves them.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(_device())
    return model


def load(model_dir: Path, spec: ModelSpec, dtype: str = "float32"):
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch_dtype = _DTYPES[dtype]
    if spec.codec is None:
        model = _model_class(spec).from_pretrained(
            model_dir, config=_config(spec), dtype=torch_dtype, local_files_only=True)
        model.to(_device())
    else:
        from dn_torch import codec

        model = _skeleton(spec, torch_dtype)
        _load_plain_tensors(model, model_dir)
        codec.attach(model, model_dir, spec)
    if spec.sparse is not None:
        from dn_torch import sparse

        sparse.attach(model, model_dir, spec)
    model.eval()
    model.dn_dtype = dtype
    return model


def _load_plain_tensors(model, model_dir: Path) -> None:
    """Copy the tensors stored under their usual names (norms, embeddings, ...) into the skeleton."""
    from safetensors.torch import load_file

    params = dict(model.named_parameters())
    for f in weight_files(model_dir):
        for name, t in load_file(f, device=str(_device())).items():
            if name in params:
                with torch.no_grad():
                    params[name].copy_(t)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


def make_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


@torch.inference_mode()
def logits(model, tokens: np.ndarray, cache=None, last_only: bool = False) -> np.ndarray:
    ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long, device=_device())
    out = model(input_ids=ids, past_key_values=cache, use_cache=cache is not None,
                logits_to_keep=1 if last_only else 0)
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


def resident_weight_bytes(model) -> int:
    """Bytes of every distinct storage behind parameters and buffers (tied weights counted once)."""
    storages = {}
    for t in list(model.parameters()) + list(model.buffers()):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def peak_memory_bytes() -> int:
    """CUDA: peak allocated by torch; CPU: peak resident set size of the process."""
    if _device().type == "cuda":
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def reset_peak_memory() -> None:
    if _device().type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def free(model) -> None:
    """Give cached allocator memory back once the caller has dropped its model references."""
    if _device().type == "cuda":
        torch.cuda.empty_cache()
