"""A decode step of one token per sequence without transformers' per-step machinery (mask building, output
capture, the attention-interface lookup; benchmarks/bench_decode.py times the step against the forward), over
the model's own modules, so every weight format, residency and sparse MLP runs as it does in the model's forward.
Llama and Qwen2 (full attention, no padding); anything else runs the model's forward. Tested against it
(tests/test_decode.py)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from dn.formats import decode as ref
from dn.runtime import memory
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
            t = key_states.shape[-2]
            room, n = self.reserve(t, key_states, value_states)
            room[0][..., n:n + t, :].copy_(key_states)
            room[1][..., n:n + t, :].copy_(value_states)
            return self.keys, self.values

        def reserve(self, t: int, key_like, value_like) -> tuple[tuple, int]:
            """Room for t more tokens shaped as key_like and value_like [B, heads, t, hd] (grown, the held tokens
            copied in, where short); keys and values then view the held tokens and those t. -> (room, n held)."""
            if not self.is_initialized:  # a one-token prompt: the first token is a step
                self.lazy_initialization(key_like, value_like)
            n = self.keys.shape[-2] if self.keys.numel() else 0
            room = self._room
            if (room is None or n + t > room[0].shape[-2] or (self.keys.numel() and
                    (self.keys.data_ptr() != room[0].data_ptr() or self.keys.shape[:2] != room[0].shape[:2]))):
                size = -(-(n + t + n // 4) // _CHUNK) * _CHUNK
                room = tuple(a.new_empty((*a.shape[:2], size, a.shape[-1])) for a in (key_like, value_like))
                if n:
                    room[0][..., :n, :].copy_(self.keys)
                    room[1][..., :n, :].copy_(self.values)
                self._room = room
            self.keys, self.values = room[0][..., :n + t, :], room[1][..., :n + t, :]
            return room, n

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
    makes one kernel call for them (each call has a fixed cost besides its reading). Each projection keeps its
    place as a Part serving its columns of the last input's product: the forward still calls them one by one."""

    def __init__(self, whole: nn.Module, sizes: list[int]):
        super().__init__()
        self.whole, self.sizes, self._memo = whole, sizes, None

    def rows(self, i: int) -> slice:
        """Part i's rows of the joined matrix (its columns of the product)."""
        lo = sum(self.sizes[:i])
        return slice(lo, lo + self.sizes[i])

    def part(self, x: torch.Tensor, i: int) -> torch.Tensor:
        memo = self._memo
        if memo is None or memo[0] is not x:
            memo = self._memo = (x, self.whole(x), set())
        memo[2].add(i)
        if len(memo[2]) == len(self.sizes):
            self._memo = None  # every part served: hold no activations between forwards
        return memo[1][..., self.rows(i)]


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
        return f.whole.weight[f.rows(self.i)]


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
        setattr(parent, n, Part(fused, i))
    for m in mods:  # the separate matrices freed now, and their pages handed back: else each layer's stay
        for k in m._buffers:  # resident as free heap until the load settles, raising the load's peak
            m._buffers[k] = None
    memory.trim()


def fuse(model) -> None:
    """At load, for the families the step runs: each layer's q, k, v and its MLP's gate and up (the model's own
    MLP: not a sparse or resident one) joined where _whole can."""
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


def _silu(mlp) -> bool:
    return getattr(getattr(mlp, "config", None), "hidden_act", None) == "silu"


def _row(parent, names: list[str]):
    """x -> the projections' outputs as one contiguous row (q|k|v, gate|up): one call where they are joined."""
    if isinstance(getattr(parent, names[0]), Part):
        return _linear(parent.dn_fused.whole)
    fns = [_linear(getattr(parent, n)) for n in names]
    return lambda x: torch.cat([f(x) for f in fns], -1)


def _gated(lib, mlp):
    """x -> the MLP's output: a gated SiLU MLP of the model's own as its gate|up row, one C call, then down;
    any other (sparse, resident) as its module."""
    if type(mlp).__name__ not in ("LlamaMLP", "Qwen2MLP") or not _silu(mlp):
        return lambda x: mlp(x).contiguous()
    gate_up, down = _row(mlp, ["gate_proj", "up_proj"]), _linear(mlp.down_proj)

    def call(x):
        gu = gate_up(x).contiguous()
        a = gu.new_empty(*gu.shape[:-1], gu.shape[-1] // 2)
        lib.dn_silu_mul(gu.data_ptr(), a.shape[-1], a.numel() // a.shape[-1], a.data_ptr())
        return down(a)
    return call


def _native(model):
    """(the C library, per layer (qkv, o_proj, mlp, w1, w2), the final norm's weight, eps) where every layer has
    RMSNorms (one eps) and heads of at most 512; else None."""
    if "_dn_native" in model.__dict__:
        return model.__dict__["_dn_native"]
    lib, inner = ref.native(), model.model
    norms = [inner.norm, *(n for la in inner.layers for n in (la.input_layernorm, la.post_attention_layernorm))]
    ok = (lib is not None and all(_norm(n) is not n for n in norms) and len({n.variance_epsilon for n in norms}) == 1
          and all(layer.self_attn.head_dim <= 512 for layer in inner.layers))
    layers = [(_row(layer.self_attn, ["q_proj", "k_proj", "v_proj"]), _linear(layer.self_attn.o_proj),
               _gated(lib, layer.mlp), layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
              for layer in (inner.layers if ok else ())]
    got = model.__dict__["_dn_native"] = (lib, layers, inner.norm.weight, inner.norm.variance_epsilon) if ok else None
    return got


def _native_step(model, native, h, cos, sin, cache) -> torch.Tensor:
    """step with the small ops in C (dn/formats/csrc/decode.c): per layer a matmul call for q|k|v (joined), one
    C call for rope, the cache and attention, o_proj, a C call for the residual and norm, the MLP (its gate|up,
    a C call for SiLU times up, its down) and a C call for the residual and the next norm."""
    lib, layers, final, eps = native
    cfg, (b, _, d) = model.config, h.shape
    h, x = h.contiguous().clone(), torch.empty_like(h)
    cos, sin = cos.reshape(-1)[-cos.shape[-1]:].contiguous(), sin.reshape(-1)[-sin.shape[-1]:].contiguous()
    attn0 = model.model.layers[0].self_attn
    hd, nkv, nq = attn0.head_dim, cfg.num_key_value_heads, cfg.num_attention_heads
    lib.dn_add_norm(h.data_ptr(), None, layers[0][3].data_ptr(), eps, d, b, x.data_ptr())
    kv_like = h.new_empty(b, nkv, 1, hd)
    for i, ((qkv, o_proj, mlp, _, w2), layer) in enumerate(zip(layers, cache.layers)):
        y = qkv(x).contiguous()
        room, n = layer.reserve(1, kv_like, kv_like)
        o = h.new_empty(b, 1, nq * hd)
        lib.dn_attend(y.data_ptr(), b, nq, nkv, hd, cos.data_ptr(), sin.data_ptr(), room[0].data_ptr(),
                      room[1].data_ptr(), room[0].shape[2], n, attn0.scaling, o.data_ptr())
        y = o_proj(o)  # held: a pointer to a freed tensor is memory the allocator writes into
        lib.dn_add_norm(h.data_ptr(), y.data_ptr(), w2.data_ptr(), eps, d, b, x.data_ptr())
        y = mlp(x)
        w = layers[i + 1][3] if i + 1 < len(layers) else final
        lib.dn_add_norm(h.data_ptr(), y.data_ptr(), w.data_ptr(), eps, d, b, x.data_ptr())
    return model.lm_head(x)


def step(model, ids: torch.Tensor, cache) -> torch.Tensor:
    """ids [B, 1] -> logits [B, 1, vocab] of the next token, the cache grown by one: the model's forward for one
    token per sequence, its modules called in its order. Rope runs on the queries and keys at once, rotate_half
    as a roll by half a head times the sine with its first half negated (the same products, signs and sums)."""
    inner, b = model.model, ids.shape[0]
    h = inner.embed_tokens(ids)
    pos = torch.full((1, 1), cache.get_seq_length(), dtype=torch.long, device=h.device)
    cos, sin = inner.rotary_emb(h, position_ids=pos)
    native = _native(model) if h.dtype == torch.bfloat16 and h.device.type == "cpu" else None
    if native is not None:
        return _native_step(model, native, h, cos, sin, cache)
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
