"""A pipeline rank on mx.distributed (the ring backend under mlx.launch; MPI or JACCL where mlx.launch starts
them); dn.runtime.pipeline drives it. The layers of other ranks become empty modules before any tensor is read."""

from __future__ import annotations

import copy
import os

import mlx.core as mx
import numpy as np
from mlx import nn

from dn_mlx.ops import DTYPES


def connect(timeout_s: float) -> mx.distributed.Group:
    """The group mlx.launch set up (MLX_HOSTFILE, MLX_RANK). The ring has no timeout of its own: the watchdog of
    dn.runtime.pipeline bounds each wait, and a closed socket fails the pending receive."""
    hostfile = os.environ.get("MLX_HOSTFILE")
    peers = bool(hostfile) and os.path.isfile(hostfile) and os.path.getsize(hostfile) > 1  # one host: written empty
    if not peers:
        os.environ.pop("MLX_HOSTFILE", None)  # mlx would parse the empty file and fail
    return mx.distributed.init(strict=peers, backend="any")


def rank(group) -> int:
    """This process's place in the ring (MLX_RANK under mlx.launch)."""
    return group.rank()


def size(group) -> int:
    """How many processes mlx.launch started (its hosts, each repeated -n times)."""
    return group.size()


def close(group) -> None:
    """Nothing to tear down: the sockets close with the process."""


def send(group, x, dst: int) -> int:
    """Evaluated at once (a lazy send would go out only when something downstream is evaluated); returns the
    bytes that left."""
    a = mx.array(x) if isinstance(x, np.ndarray) else x
    mx.eval(mx.distributed.send(a, dst, group=group))
    return a.nbytes


def recv(group, shape: tuple, dtype: str, src: int) -> mx.array:
    """The array src sends, evaluated here, so a dead peer fails this call rather than a later one."""
    out = mx.distributed.recv(tuple(shape), DTYPES[dtype], src, group=group)
    mx.eval(out)
    return out


def maps_lookups() -> bool:
    """The loader maps an embedding a rank only looks up (dn_mlx.gguf.MappedEmbedding), on any device: only the
    rows looked up are read from the file and computed."""
    return True


class Elsewhere(nn.Module):
    """A decoder layer that another rank holds. Its cache entry still takes the tokens (one-wide keys), so the
    offsets that mlx-lm's masks are built from stay true whichever layer they are read from."""

    elsewhere = True  # what the loaders' per-layer steps (codec, sparse) skip

    def __init__(self, like: nn.Module):
        nn.Module.__init__(self)
        for key, value in vars(like).items():  # use_sliding and the like, which the model loop reads
            if isinstance(value, (bool, int, float, str)) and not key.startswith("_"):
                setattr(self, key, value)

    def __call__(self, x, mask=None, cache=None):
        if cache is not None:
            blank = mx.zeros((x.shape[0], 1, x.shape[1], 1), x.dtype)
            cache.update_and_fetch(blank, blank)
        return x


def cut(model, stage) -> None:
    """Before the loader reads: Elsewhere for the layers this stage does not hold, nn.Identity for an embedding,
    norm or lm_head it does not hold."""
    body = model.model
    lo, hi = stage.span(len(body.layers))
    body.layers = [layer if lo <= i < hi else Elsewhere(layer) for i, layer in enumerate(body.layers)]
    tied = not hasattr(model, "lm_head") or getattr(model, "tie_word_embeddings", False)
    if not stage.holds_embedding(tied):
        body.embed_tokens = nn.Identity()
    if not stage.last:
        body.norm = nn.Identity()
        if hasattr(model, "lm_head"):
            model.lm_head = nn.Identity()
    if not stage.first and getattr(model, "model_type", None) == "gemma3_text":
        # Gemma3Model scales whatever enters it, embeddings handed in too: a scale of 1 past the first rank
        body.args = copy.copy(body.args)
        body.args.hidden_size = 1


def head(model, h: mx.array) -> np.ndarray:
    """This rank's rows of a shared tied head (model.dn_head) over a normed hidden state: float32 logits (numpy),
    capped where the model caps its logits."""
    logits = model.dn_head(h)
    if cap := getattr(getattr(model, "args", None), "final_logit_softcapping", None):
        logits = mx.tanh(logits / cap) * cap
    return np.array(logits.astype(mx.float32))


def forward(model, stage, x, cache=None, last_only: bool = False) -> mx.array | np.ndarray:
    """Token ids (numpy [1, T]) into the first stage, the hidden state from the previous one elsewhere; out comes
    the hidden state for the next stage or, from the last, float32 logits as numpy (with the lm_head shared with
    rank 0, Stage.vocab_split: its rows' logits and the normed hidden state)."""
    ids = mx.array(np.asarray(x)) if stage.first else None
    embeddings = None if stage.first else x
    if stage.last and stage.vocab_split:
        h = model.model(ids, cache=cache, input_embeddings=embeddings)
        h = (h[:, -1:] if last_only else h).astype(DTYPES[model.dn_dtype])  # rank 0 reads it at the loaded dtype
        mx.eval(h)
        return head(model, h), h
    if stage.last:
        logits = model(ids, cache=cache, input_embeddings=embeddings)
        return np.array((logits[:, -1:] if last_only else logits).astype(mx.float32))
    h = model.model(ids, cache=cache, input_embeddings=embeddings)
    mx.eval(h)
    return h
