"""A decode step of one token per sequence without transformers' per-step machinery (mask building, output
capture, the attention-interface lookup: about 11 ms of a 28 ms step on the default model, one CPU thread), over
the model's own modules, so every weight format, residency and sparse MLP runs as it does in the model's forward.
Llama and Qwen2 (full attention, no padding); anything else runs the model's forward. Tested against it
(tests/test_decode.py)."""

from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F

FAMILIES = {"llama", "qwen2"}
_CHUNK = 256  # tokens a cache layer grows by at least


@functools.cache
def grown_layer():
    from transformers.cache_utils import DynamicLayer  # heavy: imported on first use

    class GrownLayer(DynamicLayer):
        """transformers' DynamicLayer that writes each token into spare room instead of concatenating the whole
        cache again (a copy of every cached key and value, each step); keys and values are views of the room.
        A crop or batch edit elsewhere leaves other tensors in their place: the next update copies them in."""

        def lazy_initialization(self, key_states, value_states) -> None:
            super().lazy_initialization(key_states, value_states)
            self._room = None

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, t = (self.keys.shape[-2] if self.keys.numel() else 0), key_states.shape[-2]
            room = self._room
            if (room is None or n + t > room[0].shape[-2] or (self.keys.numel() and
                    (self.keys.data_ptr() != room[0].data_ptr() or self.keys.shape[:2] != room[0].shape[:2]))):
                size = -(-(n + t + n // 4) // _CHUNK) * _CHUNK
                shape = (*key_states.shape[:2], size, key_states.shape[-1]), (*value_states.shape[:2], size,
                                                                              value_states.shape[-1])
                room = (key_states.new_empty(shape[0]), value_states.new_empty(shape[1]))
                if n:
                    room[0][..., :n, :].copy_(self.keys)
                    room[1][..., :n, :].copy_(self.values)
                self._room = room
            room[0][..., n:n + t, :].copy_(key_states)
            room[1][..., n:n + t, :].copy_(value_states)
            self.keys, self.values = room[0][..., :n + t, :], room[1][..., :n + t, :]
            return self.keys, self.values

        @property
        def nbytes(self) -> int:
            """The room held, spare included (dn.serve.engine.cache_bytes reads it)."""
            return 0 if getattr(self, "_room", None) is None else sum(r.nbytes for r in self._room)

    return GrownLayer


def _runs(model) -> bool:
    """Whether the step below computes what this model's forward computes."""
    cfg, inner = model.config, getattr(model, "model", None)
    if cfg.model_type not in FAMILIES or inner is None or not hasattr(inner, "rotary_emb"):
        return False
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or ())):
        return False
    return all(hasattr(layer, "self_attn") and hasattr(layer, "input_layernorm") for layer in inner.layers)


def runs(model, cache) -> bool:
    """The step applies: a family it knows and a cache of grown layers only (no rotating or quantized one)."""
    ok = model.__dict__.get("_dn_decode")
    if ok is None:
        ok = model.__dict__["_dn_decode"] = _runs(model)
    cls = grown_layer()
    return ok and all(type(layer) is cls for layer in getattr(cache, "layers", ()))


def _rotary_apply(model):
    fn = model.__dict__.get("_dn_rotary")
    if fn is None:
        module = importlib.import_module(type(model.model.layers[0].self_attn).__module__)
        fn = model.__dict__["_dn_rotary"] = module.apply_rotary_pos_emb
    return fn


def step(model, ids: torch.Tensor, cache) -> torch.Tensor:
    """ids [B, 1] -> logits [B, 1, vocab] of the next token, the cache grown by one: the model's forward for one
    token per sequence, its modules called in its order."""
    inner, rope = model.model, _rotary_apply(model)
    h = inner.embed_tokens(ids)
    pos = torch.full((1, 1), cache.get_seq_length(), dtype=torch.long, device=h.device)
    cos, sin = inner.rotary_emb(h, position_ids=pos)
    b = ids.shape[0]
    for i, layer in enumerate(inner.layers):
        attn, x = layer.self_attn, layer.input_layernorm(h)
        q = attn.q_proj(x).view(b, 1, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, 1, -1, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(b, 1, -1, attn.head_dim).transpose(1, 2)
        q, k = rope(q, k, cos, sin)
        k, v = cache.layers[i].update(k, v)
        o = F.scaled_dot_product_attention(q, k, v, scale=attn.scaling, enable_gqa=k.shape[1] != q.shape[1])
        h = h + attn.o_proj(o.transpose(1, 2).reshape(b, 1, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(inner.norm(h))
