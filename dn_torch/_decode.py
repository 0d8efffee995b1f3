"""A decode step of one token per sequence without transformers' per-step machinery (mask building, output
capture, the attention-interface lookup: about 11 ms of a 28 ms step on the default model, one CPU thread), over
the model's own modules, so every weight format, residency and sparse MLP runs as it does in the model's forward.
Llama and Qwen2 (full attention, no padding); anything else runs the model's forward. Tested against it
(tests/test_decode.py)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from dn_torch import gguf, quant

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
    attn = inner.layers[0].self_attn if len(inner.layers) else None
    if getattr(cfg, "partial_rotary_factor", 1.0) != 1.0 or attn is None or not hasattr(attn, "head_dim"):
        return False  # rope over part of a head
    return all(hasattr(layer, "self_attn") and hasattr(layer, "input_layernorm") for layer in inner.layers)


def runs(model, cache) -> bool:
    """The step applies: a family it knows and a cache of grown layers only (no rotating or quantized one)."""
    ok = model.__dict__.get("_dn_decode")
    if ok is None:
        ok = model.__dict__["_dn_decode"] = _runs(model)
    cls = grown_layer()
    return ok and all(type(layer) is cls for layer in getattr(cache, "layers", ()))


def _norm(module):
    """The RMSNorm as one fused op, computing what LlamaRMSNorm and Qwen2RMSNorm compute (float32, then
    the weight at the input's dtype); any other norm as itself."""
    if type(module).__name__ not in ("LlamaRMSNorm", "Qwen2RMSNorm"):
        return module
    w, eps, shape = module.weight, module.variance_epsilon, tuple(module.weight.shape)
    return lambda x: w * F.rms_norm(x.float(), shape, None, eps).to(x.dtype)


def _linear(module):
    """A quantized linear in torch's int4 layout as its kernel call (what its forward runs for a few tokens,
    without the frames and checks); any other as itself."""
    if type(module) is not quant.QuantizedLinear or quant._kind(module.weight) != "int4":
        return module
    packed, scales, gs, bias = module.weight, module.scales, module.group_size, module.bias
    mm, k = torch.ops.aten._weight_int4pack_mm_for_cpu, module.in_features

    def call(x):
        if x.dtype != scales.dtype or x.device.type != "cpu" or x.numel() > quant._KERNEL_TOKENS["int4"] * k:
            return module(x)
        y = mm(x.reshape(-1, k), packed, gs, scales).view(*x.shape[:-1], -1)
        return y if bias is None else y + bias
    return call


class Fused(nn.Module):
    """Projections that read one input (q, k and v; gate and up) held as one matrix, so a decode step
    makes one kernel call for them (a call costs about 13 us besides its reading). Each projection keeps its
    place as a Part serving its columns of the last input's product: the forward still calls them one by one."""

    def __init__(self, whole: nn.Module, sizes: list[int]):
        super().__init__()
        self.whole, self.sizes, self._memo = whole, sizes, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.whole(x)

    def part(self, x: torch.Tensor, i: int) -> torch.Tensor:
        memo = self._memo
        if memo is None or memo[0] is not x:
            memo = self._memo = (x, self.whole(x), set())
        memo[2].add(i)
        if len(memo[2]) == len(self.sizes):
            self._memo = None  # every part served: hold no activations between forwards
        lo = sum(self.sizes[:i])
        return memo[1][..., lo:lo + self.sizes[i]]


class Part(nn.Module):
    """One projection of a Fused (held outside the module tree: its parent holds it once)."""

    def __init__(self, fused: Fused, i: int):
        super().__init__()
        self._fused, self.i = (fused,), i
        self.in_features, self.out_features = fused.whole.in_features, fused.sizes[i]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fused[0].part(x, self.i)

    @property
    def weight(self) -> torch.Tensor:
        """Its rows of the joined matrix (a view: int4 packs and GGUF blocks are row-major by output)."""
        f = self._fused[0]
        lo = sum(f.sizes[:self.i])
        return f.whole.weight[lo:lo + f.sizes[self.i]]


def _whole(mods: list) -> nn.Module | None:
    """One module of mods' rows in order, where that computes each one's rows unchanged (tested in
    tests/test_decode.py): int4 kernel layouts in whole blocks of the pack's rows, or GGUF blocks of one type
    (each row its own blocks); all over one input, all with a bias or none. Else None."""
    a = mods[0]
    if not all(type(m) in (quant.QuantizedLinear, gguf.GGUFLinear) for m in mods):
        return None
    if len({(type(m), m.in_features, m.bias is None, m.compute_dtype) for m in mods}) != 1:
        return None
    n, bias = sum(m.out_features for m in mods), None if a.bias is None else torch.cat([m.bias for m in mods])
    if type(a) is quant.QuantizedLinear and all(quant._kind(m.weight) == "int4" for m in mods):
        big = quant._int4_block_rows()
        if len({m.group_size for m in mods}) != 1 or any(m.out_features % big for m in mods):
            return None
        whole = quant.QuantizedLinear(a.in_features, n, a.bias is not None, 4, a.group_size, a.compute_dtype)
        whole.scales, whole.biases = torch.cat([m.scales for m in mods], 1), None
    elif type(a) is gguf.GGUFLinear and len({m.kind for m in mods}) == 1 and all(m.out is None for m in mods):
        whole = gguf.GGUFLinear(a.in_features, n, a.bias is not None, a.kind, a.compute_dtype)
    else:
        return None
    whole.weight, whole.bias = torch.cat([m.weight for m in mods]), bias
    return whole


def _join(parent: nn.Module, names: list[str]) -> None:
    mods = [getattr(parent, n) for n in names]
    whole = _whole(mods)
    if whole is None:
        return
    parent.dn_fused = fused = Fused(whole, [m.out_features for m in mods])
    for i, n in enumerate(names):
        setattr(parent, n, Part(fused, i))  # the separate matrices are dropped here, one layer at a time


def fuse(model) -> None:
    """At load, for the families the step runs: each layer's q, k, v and its MLP's gate and up (the model's own
    MLP: not a sparse or resident one) joined where _fusable."""
    if model.config.model_type not in FAMILIES or not hasattr(model, "model"):
        return
    for layer in model.model.layers:
        if hasattr(layer, "self_attn"):
            _join(layer.self_attn, ["q_proj", "k_proj", "v_proj"])
        if type(getattr(layer, "mlp", None)).__name__ in ("LlamaMLP", "Qwen2MLP"):
            _join(layer.mlp, ["gate_proj", "up_proj"])


def _projections(attn):
    """x -> (q, k, v): one call where they are fused."""
    if isinstance(attn.q_proj, Part):
        whole, sizes = _linear(attn.dn_fused.whole), attn.dn_fused.sizes
        return lambda x: whole(x).split(sizes, -1)
    q, k, v = (_linear(getattr(attn, p + "_proj")) for p in "qkv")
    return lambda x: (q(x), k(x), v(x))


def _mlp(mlp):
    """The gated MLP with its gate and up in one call where they are fused; else the module."""
    if not isinstance(getattr(mlp, "gate_proj", None), Part):
        return mlp
    whole, n, act, down = _linear(mlp.dn_fused.whole), mlp.dn_fused.sizes[0], mlp.act_fn, _linear(mlp.down_proj)

    def call(x):
        gu = whole(x)
        return down(act(gu[..., :n]) * gu[..., n:])
    return call


def _plan(model) -> list:
    """Per layer, what step calls: norms, projections and the MLP as above, the attention module itself."""
    plan = model.__dict__.get("_dn_plan")
    if plan is None:
        plan = model.__dict__["_dn_plan"] = [
            (_norm(layer.input_layernorm), _projections(layer.self_attn), _linear(layer.self_attn.o_proj),
             _norm(layer.post_attention_layernorm), _mlp(layer.mlp), layer.self_attn)
            for layer in model.model.layers]
    return plan


def step(model, ids: torch.Tensor, cache) -> torch.Tensor:
    """ids [B, 1] -> logits [B, 1, vocab] of the next token, the cache grown by one: the model's forward for one
    token per sequence, its modules called in its order. Rope runs on the queries and keys at once, rotate_half
    as a roll by half a head times the sine with its first half negated (the same products, signs and sums)."""
    inner, b = model.model, ids.shape[0]
    h = inner.embed_tokens(ids)
    pos = torch.full((1, 1), cache.get_seq_length(), dtype=torch.long, device=h.device)
    cos, sin = inner.rotary_emb(h, position_ids=pos)
    half = cos.shape[-1] // 2
    cos, sin = cos[:, :, None], torch.cat([-sin[..., :half], sin[..., half:]], -1)[:, :, None]
    for (norm1, qkv, o_proj, norm2, mlp, attn), layer in zip(_plan(model), cache.layers):
        hd = attn.head_dim
        q, k, v = qkv(norm1(h))
        nq = q.shape[-1] // hd
        qk = torch.cat([q, k], -1).view(b, 1, -1, hd)
        qk = qk * cos + qk.roll(half, -1) * sin
        q, k = qk[:, :, :nq].transpose(1, 2), qk[:, :, nq:].transpose(1, 2)
        k, v = layer.update(k, v.view(b, 1, -1, hd).transpose(1, 2))
        o = F.scaled_dot_product_attention(q, k, v, scale=attn.scaling, enable_gqa=k.shape[1] != q.shape[1])
        h = h + o_proj(o.transpose(1, 2).reshape(b, 1, -1))
        h = h + mlp(norm2(h))
    return model.lm_head(_norm(inner.norm)(h))
