"""One rank of a pipeline on torch.distributed (dn.runtime.pipeline has the logic): gloo on the CPU, NCCL on CUDA,
under torchrun. Another rank's layers are weightless stubs put in before the loader reads anything."""

from __future__ import annotations

import datetime
import functools
import inspect

import numpy as np
import torch
import torch.distributed as dist

from dn.core.errors import DnError
from dn_torch import gguf
from dn_torch.ops import DTYPES
from dn_torch.ops import device as _device


def connect(timeout_s: float):
    """torchrun's env:// rendezvous; gloo's and NCCL's operations time out after timeout_s (the watchdog of
    dn.runtime.pipeline is the first to fire; this is the transport's own bound)."""
    backend = "nccl" if _device().type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(_device())
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.group.WORLD


def rank(group) -> int:
    """RANK as torchrun set it, once the process group is up."""
    return dist.get_rank(group)


def size(group) -> int:
    """WORLD_SIZE: nnodes times nproc-per-node."""
    return dist.get_world_size(group)


def close(group) -> None:
    """Leave the group cleanly (torch warns at exit about a group left open)."""
    dist.destroy_process_group()


def _wire(x: torch.Tensor) -> torch.Tensor:
    """gloo moves raw bytes but knows no bfloat16: 16-bit floats travel as int16."""
    return x.view(torch.int16) if x.dtype == torch.bfloat16 else x


def send(group, x, dst: int) -> int:
    """x: numpy (headers, logits) or a tensor (hidden states) -> rank dst; returns the bytes sent."""
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x.contiguous()
    t = t.to(_device()) if dist.get_backend(group) == "nccl" else t.cpu()
    dist.send(_wire(t), dst, group=group)
    return t.numel() * t.element_size()


def recv(group, shape: tuple, dtype: str, src: int) -> torch.Tensor:
    dev = _device() if dist.get_backend(group) == "nccl" else torch.device("cpu")
    out = torch.empty(shape, dtype=DTYPES[dtype], device=dev)
    dist.recv(_wire(out), src, group=group)
    return out.to(_device())


def maps_lookups() -> bool:
    """On a CPU the loader maps an embedding a rank only looks up (dn.runtime.pipeline.Stage.lookup)."""
    return _device().type == "cpu"


class Skipped(torch.nn.Module):
    """Another rank's decoder layer: no weights; passes the hidden state on and grows its cache layer by the tokens
    with one-wide keys (a cache counts no tokens in an empty tensor), so that positions and masks, read from
    whichever layer's cache, stay right: 2 values per token and skipped layer."""

    elsewhere = True  # what the loaders' per-layer steps (codec, sparse) skip

    def __init__(self, layer, i: int):
        super().__init__()
        for k, v in vars(layer).items():  # attention_type, layer_idx...: what the model's loop reads
            if not k.startswith("_") and isinstance(v, (str, int, bool, float)):
                setattr(self, k, v)
        self.layer_idx = i

    def forward(self, hidden_states, *args, cache=None, past_key_values=None, **kwargs):
        c = cache if cache is not None else past_key_values
        if c is not None:
            e = hidden_states.new_empty(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            c.update(e, e, self.layer_idx)
        return hidden_states


class Passed(torch.nn.Module):
    """The final norm before the last rank, and the lm_head or embedding a rank does not hold: the identity,
    with no parameters for the loader to fill."""

    def forward(self, x, *args, **kwargs):
        return x


def cut(model, stage) -> None:
    """Before reading: stubs for what the stage does not hold (dn.runtime.pipeline.Stage), so the loader finds no
    slot for those tensors and never reads them; a share of a tied GGUF lm_head (Stage.head_rows) becomes a block
    linear of those rows, which fill_head fills."""
    inner, n = model.model, len(model.model.layers)
    lo, hi = stage.span(n)
    for i in [*range(lo), *range(hi, n)]:
        inner.layers[i] = Skipped(inner.layers[i], i)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    rows, emb = stage.head_rows(model.config.vocab_size, tied), inner.embed_tokens
    if not stage.holds_embedding(tied):
        inner.embed_tokens = Passed()
    if not stage.last:
        inner.norm, model.lm_head = Passed(), Passed()
    if rows is not None and stage.vocab_split:
        if not isinstance(emb, gguf.GGUFEmbedding):
            raise DnError("a shared lm_head needs a native GGUF folder's embedding")
        model.lm_head = gguf.GGUFLinear(emb.embedding_dim, rows[1] - rows[0], False, emb.kind, emb.compute_dtype)
        model.lm_head.out = torch.float32  # float32 logits, as a whole tied head gives


@torch.inference_mode()
def head(model, h: torch.Tensor) -> np.ndarray:
    """This rank's rows of the lm_head over a normed hidden state: float32 logits (numpy), capped as the model's
    own head caps them (Gemma 2's final_logit_softcapping)."""
    logits = model.lm_head(h.to(_device())).float()
    if cap := getattr(model.config, "final_logit_softcapping", None):
        logits = torch.tanh(logits / cap) * cap
    return logits.cpu().numpy()


@functools.cache
def _cache_kwarg(cls) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


@torch.inference_mode()
def forward(model, stage, x, cache=None, last_only: bool = False):
    """The stage's layers over x: token ids [1, T] (numpy) on the first rank, else the previous rank's hidden
    state. -> the hidden state after them, or on the last rank float32 logits (numpy)."""
    if stage.first:
        inputs = {"input_ids": torch.as_tensor(np.asarray(x), dtype=torch.long, device=_device())}
    else:
        inputs = {"inputs_embeds": x}
    kw = {"use_cache": cache is not None, _cache_kwarg(type(model.model)): cache}
    if not stage.last:
        return model.model(**inputs, **kw).last_hidden_state
    if stage.vocab_split:  # rank 0 holds the first rows of the head: it gets the normed hidden state too
        h = model.model(**inputs, **kw).last_hidden_state
        h = h[:, -1:] if last_only else h
        return head(model, h), h.to(DTYPES[model.dn_dtype])  # rank 0 reads it at the loaded dtype
    return model(**inputs, **kw, logits_to_keep=1 if last_only else 0).logits.float().cpu().numpy()
