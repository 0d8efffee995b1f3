"""The model spec: what any backend needs to know about a model, as plain data.

A spec is built from a Hugging Face folder (config.json + safetensors headers) and saved beside it as
`dn_spec.json`. It also translates the config between the two model stacks: transformers 5 writes the
rope base under `rope_parameters`, mlx-lm reads `rope_theta` and silently falls back to 10000 without it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from dn.core import activations, tensors
from dn.core.errors import DnError
from dn.core.files import atomic_file
from dn.formats import gguf_blocks, quant

SPEC_VERSION = 1
SPEC_FILE = "dn_spec.json"
# a model folder's files besides its weights, copied as they are into every folder dn writes from it
COPY = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json", "chat_template.jinja", "tokenizer.model")
# HF model_type -> family dn knows; both backends run these with the field's model code.
FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}
ROLES = ("embeddings", "attention", "mlp", "norms", "lm_head", "other")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "F32": 4, "BF16": 2, "F16": 2,
               "I64": 8, "I32": 4, "U32": 4, "I8": 1, "U8": 1, "I16": 2, "U16": 2}


@dataclass
class Architecture:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False
    rope_scaling: dict | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str = "bfloat16"
    hidden_act: str = "silu"                      # config.json's name (Gemma: hidden_activation)
    # Gemma 3 only (None elsewhere): per-layer sliding or full attention, each with its own rope base
    layer_types: list[str] | None = None
    sliding_window: int | None = None
    rope_local_base_freq: float | None = None     # rope base of the sliding layers (rope_theta: full ones)
    query_pre_attn_scalar: int | float | None = None  # attention scale is its -1/2 power
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None

    @property
    def mlp_act(self) -> str:
        """The gated MLP's activation as dn names it ("silu" or "gelu_tanh")."""
        return activations.of_hf(self.hidden_act)

    @property
    def gemma(self) -> bool:
        return self.model_type == "gemma3_text"

    @classmethod
    def from_hf_config(cls, cfg: dict) -> Architecture:
        model_type = cfg.get("model_type")
        if model_type not in FAMILIES:
            raise DnError(f"unsupported architecture {model_type!r} (dn runs: {', '.join(sorted(FAMILIES))})")
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            theta, scaling = _rope(cfg)
            return cls(
                model_type=model_type, hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]), num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                vocab_size=int(cfg["vocab_size"]), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=theta, rope_scaling=scaling,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
                torch_dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"),
                hidden_act=str(cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"),
                **(_gemma3(cfg, int(cfg["num_hidden_layers"])) if model_type == "gemma3_text" else {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DnError(f"config.json is missing or has a bad value for {e}") from None

    def _fields(self) -> dict:
        """asdict without the Gemma-only fields on other families (their configs never had them)."""
        d = asdict(self)
        return d if self.gemma else {k: v for k, v in d.items() if k not in _GEMMA3_FIELDS}

    def to_hf_config(self) -> dict:
        """config.json for transformers (4 and 5 both read it)."""
        cfg = {k: v for k, v in self._fields().items() if k not in ("rope_scaling",)}
        cfg["architectures"] = [_HF_CLASS[self.model_type]]
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope = {**self.rope_scaling, "rope_theta": self.rope_theta}
            cfg["rope_scaling"] = dict(self.rope_scaling)
        cfg["rope_parameters"] = rope
        if self.gemma:  # transformers 5: one rope per layer type; 4 reads rope_theta/rope_local_base_freq
            cfg["hidden_activation"] = cfg.pop("hidden_act")
            cfg["sliding_window_pattern"] = _pattern(self.layer_types)  # what mlx_lm.load reads of a -q folder
            cfg["rope_parameters"] = {"full_attention": rope, "sliding_attention": {
                "rope_type": "default", "rope_theta": self.rope_local_base_freq}}
        return cfg

    def to_mlx_config(self) -> dict:
        """Overrides for mlx-lm's ModelArgs: rope_theta always explicit."""
        cfg = {k: v for k, v in self._fields().items()
               if k not in ("bos_token_id", "eos_token_id", "torch_dtype")}
        cfg["rope_traditional"] = False
        cfg["rope_parameters"] = None
        if self.gemma:  # mlx-lm's gemma3_text knows the layer types only as a period: full every nth layer
            cfg["sliding_window_pattern"] = _pattern(self.layer_types)
        return cfg


_HF_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
             "qwen3": "Qwen3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
_GEMMA3_FIELDS = ("layer_types", "sliding_window", "rope_local_base_freq", "query_pre_attn_scalar",
                  "final_logit_softcapping", "attn_logit_softcapping")


def _gemma3(cfg: dict, layers: int) -> dict:
    """A gemma3_text config's own fields (transformers 4 or 5 layout), defaults as Gemma3TextConfig's."""
    pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
    types = cfg.get("layer_types") or ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                                       for i in range(layers)]
    if len(types) != layers or set(types) - {"full_attention", "sliding_attention"}:
        raise DnError(f"config.json layer_types must name full_attention or sliding_attention for each of the "
                      f"{layers} layers")
    _pattern(types)
    local = (cfg.get("rope_parameters") or {}).get("sliding_attention") or {}
    return {"layer_types": list(types), "sliding_window": int(cfg.get("sliding_window") or 4096),
            "rope_local_base_freq": float(local.get("rope_theta", cfg.get("rope_local_base_freq", 10000.0))),
            "query_pre_attn_scalar": _number(cfg.get("query_pre_attn_scalar", 256)),
            "final_logit_softcapping": cfg.get("final_logit_softcapping"),
            "attn_logit_softcapping": cfg.get("attn_logit_softcapping")}


def _number(x) -> int | float:
    """An int when integral (transformers' strict config types want one)."""
    x = float(x)
    return int(x) if x.is_integer() else x


def _pattern(types: list[str]) -> int:
    """The period of full-attention layers (mlx-lm's sliding_window_pattern): layer i is full iff (i+1) % p == 0.
    A layout with no such period is refused: mlx-lm could not run it."""
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    p = full[0] + 1 if full else len(types) + 1
    if [i for i in range(len(types)) if (i + 1) % p == 0] != full:
        raise DnError("gemma3 layer_types without a fixed period of full-attention layers are not supported "
                      "(mlx-lm reads only sliding_window_pattern)")
    return p


def _rope(cfg: dict) -> tuple[float, dict | None]:
    """(rope base, scaling dict or None) from either the transformers 4 or 5 layout."""
    params = cfg.get("rope_parameters") or {}
    if "full_attention" in params:  # gemma3 in transformers 5: the full layers' rope is the model's rope
        params = params["full_attention"] or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"}
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return float(theta), None
    if kind not in ("llama3", "linear"):
        raise DnError(f"unsupported rope scaling {kind!r}")
    return float(theta), {**scaling, "rope_type": kind}


@dataclass
class TensorInfo:
    name: str
    shape: list[int]
    dtype: str
    role: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def role_of(name: str) -> str:
    if "embed_tokens" in name:
        return "embeddings"
    if name.startswith("lm_head"):
        return "lm_head"
    if "norm" in name:
        return "norms"
    if ".self_attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    return "other"


@dataclass
class ModelSpec:
    architecture: Architecture
    tensors: list[TensorInfo]
    version: int = SPEC_VERSION
    source: str = ""
    codec: dict | None = None
    sparse: dict | None = None
    quant: dict | None = None     # config.json's "quantization" (mlx-lm's affine layout), see dn/formats/quant.py
    gguf: dict | None = None      # config.json's "gguf_quantization": module path -> GGUF block type, its blocks as is
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> ModelSpec:
        version = d.get("version")
        if isinstance(version, int) and not isinstance(version, bool) and version > SPEC_VERSION:
            raise DnError(f"this model was converted by a newer dn ({SPEC_FILE} version {version}, this dn reads "
                          f"version {SPEC_VERSION}): upgrade dn (pip install -U dreamnova) or convert it again")
        if version != SPEC_VERSION:
            raise DnError(f"unsupported dn spec version {version!r} (this dn reads {SPEC_VERSION})")
        try:
            arch = Architecture(**{f.name: d["architecture"][f.name] for f in fields(Architecture)
                                   if f.name in d["architecture"]})
            infos = [TensorInfo(**t) for t in d["tensors"]]
        except (KeyError, TypeError) as e:
            raise DnError(f"malformed {SPEC_FILE}: {e}") from None
        known = {f.name for f in fields(cls)} - {"architecture", "tensors"}
        return cls(arch, infos, **{k: v for k, v in d.items() if k in known})

    def save(self, model_dir: Path) -> None:
        path = Path(model_dir) / SPEC_FILE
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(self.to_json(), indent=1))

    def layer_tensors(self, i: int) -> list[TensorInfo]:
        return [t for t in self.tensors if f".layers.{i}." in t.name]


def read_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise DnError(f"{model_dir}: no config.json (not a Hugging Face model folder)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DnError(f"{path}: unreadable config ({e.__class__.__name__})") from None
    if not isinstance(cfg, dict):
        raise DnError(f"{path}: config is not a JSON object")
    return cfg


def weight_files(model_dir: Path) -> list[Path]:
    """The model's own safetensors files (dn's side files, dn_*.safetensors, excluded)."""
    files = [f for f in sorted(Path(model_dir).glob("*.safetensors")) if not f.name.startswith("dn_")]
    if not files:
        raise DnError(f"{model_dir}: no .safetensors weights")
    return files


def inventory(model_dir: Path) -> list[TensorInfo]:
    found = []
    for f in weight_files(model_dir):
        header, _ = tensors.read_header(f)
        found += [TensorInfo(n, list(h["shape"]), h["dtype"], role_of(n)) for n, h in header.items()]
    return sorted(found, key=lambda t: t.name)


def stored_tensors(model_dir: Path, spec: ModelSpec) -> list[TensorInfo]:
    """What a folder holds: its safetensors headers, plus the lossless-coded tensors its codec index lists."""
    found = inventory(model_dir)
    if spec.codec:
        path = Path(model_dir) / spec.codec.get("index", "dn_codec.json")
        try:
            index = json.loads(path.read_text())["tensors"]
            found += [TensorInfo(n, list(h["shape"]), h["dtype"], role_of(n)) for n, h in index.items()]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise DnError(f"{path}: unreadable codec index ({e.__class__.__name__})") from None
    return found


def load_spec(model_dir: Path) -> ModelSpec:
    """The spec of a model folder: dn_spec.json when dn wrote one, else derived from config + headers."""
    model_dir = Path(model_dir)
    path = model_dir / SPEC_FILE
    if path.is_file():
        try:
            spec = ModelSpec.from_json(json.loads(path.read_text()))
        except json.JSONDecodeError:
            raise DnError(f"{path}: not valid JSON") from None
        if spec.quant is not None:
            quant.check_config(spec.quant)
        validate(spec, stored_tensors(model_dir, spec))
        return spec
    cfg = read_config(model_dir)
    arch = Architecture.from_hf_config(cfg)
    spec = ModelSpec(arch, inventory(model_dir), source=str(model_dir), quant=_quantization(cfg),
                     gguf=_gguf_types(cfg))
    validate(spec, spec.tensors)
    return spec


def _quantization(cfg: dict) -> dict | None:
    """An mlx-lm-quantized folder's "quantization" dict (None for a dense one), checked."""
    q = cfg.get("quantization", cfg.get("quantization_config"))
    if q is None:
        return None
    if isinstance(q, dict) and "quant_method" in q:  # transformers' AWQ, GPTQ, bitsandbytes, ...
        raise DnError(f"unsupported quantization method {q['quant_method']!r} (dn reads mlx-lm's affine layout)")
    if isinstance(q, dict):  # mlx-lm's mixed recipes write null bits or group size: mlx's affine defaults
        q = {k: {**v, "group_size": v.get("group_size") or 64, "bits": v.get("bits") or 4}
             if isinstance(v, dict) else v for k, v in q.items()}
    quant.check_config(q)
    return q


def _gguf_types(cfg: dict) -> dict | None:
    """A native GGUF folder's module path -> block type, each type checked (one line for an unsupported one)."""
    types = cfg.get("gguf_quantization")
    if types is None:
        return None
    if not isinstance(types, dict):
        raise DnError("gguf_quantization in config.json is not an object")
    for path, t in types.items():
        if gguf_blocks.type_name(t) != t:
            raise DnError(f"{path}: GGUF block type {t!r} must be written by its name")
    return types


def tensor_shapes(a: Architecture, norms: bool = False) -> dict[str, list[int]]:
    """The shapes the architecture implies for the embedding, an untied lm_head and each layer's projections;
    norms=True adds a Llama-layout model's norms (input, post-attention and final), for building models."""
    h, n = a.hidden_size, a.intermediate_size
    q_out, kv_out = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
    out = {"model.embed_tokens.weight": [a.vocab_size, h]}
    if not a.tie_word_embeddings:
        out["lm_head.weight"] = [a.vocab_size, h]
    if norms:
        out["model.norm.weight"] = [h]
    for i in range(a.num_hidden_layers):
        p = f"model.layers.{i}."
        out |= {p + "self_attn.q_proj.weight": [q_out, h], p + "self_attn.k_proj.weight": [kv_out, h],
                p + "self_attn.v_proj.weight": [kv_out, h], p + "self_attn.o_proj.weight": [h, q_out],
                p + "mlp.gate_proj.weight": [n, h], p + "mlp.up_proj.weight": [n, h],
                p + "mlp.down_proj.weight": [h, n]}
        if norms:
            out |= {p + "input_layernorm.weight": [h], p + "post_attention_layernorm.weight": [h]}
    return out


def validate(spec: ModelSpec, tensors: list[TensorInfo]) -> None:
    """Check that the weights match the architecture (shapes of the projections per layer)."""
    by_name = {t.name: t for t in tensors}
    mods = quant.layout(spec.quant, by_name) if spec.quant else {}
    blocks = spec.gguf or {}
    for name, shape in tensor_shapes(spec.architecture).items():
        q, path = mods.get(name[:-len(".weight")]), name[:-len(".weight")]
        stored = quant.packed_shapes(shape, q["bits"], q["group_size"]) if q else {"weight": shape}
        if q and path not in spec.quant:  # mlx-lm's loader rule: no entry of its own, the global one applies
            _check_unlisted(by_name, path, shape, q)
        if path in blocks:
            stored = {"weight": gguf_blocks.stored_shape(shape, blocks[path])}
        for kind, want in stored.items():
            _check_shape(by_name, name[:-len("weight")] + kind, want)


def _check_unlisted(by_name: dict, path: str, shape: list[int], q: dict) -> None:
    """A quantized module with no entry of its own stored at other bits and group size than the global entry's (a
    mixed folder that lost an entry): one line naming both. Shapes that fit no bits and group size are left to
    _check_shape's message."""
    w, s = by_name.get(f"{path}.weight"), by_name.get(f"{path}.scales")
    if w is None or s is None or not s.shape or not w.shape:
        return
    cols = shape[1]
    for bits in quant.BITS:
        group = cols // max(1, s.shape[-1])
        fits = group in quant.GROUP_SIZES and quant.packed_shapes(shape, bits, group) == {
            "weight": list(w.shape), "scales": list(s.shape), "biases": list(s.shape)}
        if fits and (bits, group) != (q["bits"], q["group_size"]):
            raise DnError(f"config.json's quantization has no entry for {path}, stored at {bits} bits, groups of "
                          f"{group} (the global entry says {q['bits']} bits, groups of {q['group_size']})")


def _check_shape(by_name: dict, name: str, shape: list[int]) -> None:
    t = by_name.get(name)
    if t is None:
        raise DnError(f"weights lack tensor {name} required by the config")
    if list(t.shape) != shape:
        raise DnError(f"tensor {name} has shape {t.shape}, config implies {shape}")

