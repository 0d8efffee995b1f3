"""Convert a .gguf file into a Hugging Face folder (config.json, bf16 model.safetensors, tokenizer).

Tensors are dequantised with the `gguf` package; llama.cpp stores q/k rows permuted for its rope
layout, so they are permuted back here. The tokenizer is rebuilt with the `tokenizers` library.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dn import safetensors_io
from dn.errors import DnError

# gguf architecture -> HF model_type; the tensor layout is the same for these three.
ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
         "ffn_norm": "post_attention_layernorm", "attn_q_norm": "self_attn.q_norm",
         "attn_k_norm": "self_attn.k_norm"}
TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
       "output.weight": "lm_head.weight"}


def open_gguf(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises bare ValueError/struct errors on corrupt files
        raise DnError(f"{path}: not a readable GGUF file ({e.__class__.__name__}: {str(e)[:80]})") from None


def field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def hf_config(reader) -> dict:
    arch = field(reader, "general.architecture")
    if arch not in ARCHS:
        raise DnError(f"unsupported GGUF architecture {arch!r} (dn converts: {', '.join(ARCHS)})")

    def get(key, default=None):
        v = field(reader, f"{arch}.{key}", default)
        if v is None:
            raise DnError(f"GGUF metadata lacks {arch}.{key}")
        return v

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    names = {t.name for t in reader.tensors}
    vocab = len(field(reader, "tokenizer.ggml.tokens", []) or []) or int(get("vocab_size"))
    return {
        "model_type": ARCHS[arch], "architectures": None, "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length", hidden // heads)), "vocab_size": vocab,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length")),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"), "torch_dtype": "bfloat16",
    }


def hf_name(name: str) -> str | None:
    if name in TOP:
        return TOP[name]
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in NAMES:
        return f"model.layers.{parts[1]}.{NAMES[parts[2]]}.{parts[3]}"
    return None


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (pairs interleaved -> halves)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensors(reader, cfg: dict, progress=None):
    """Yield (hf_name, bf16 bits) for every tensor, dequantised."""
    from gguf.quants import dequantize

    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            raise DnError(f"GGUF tensor {t.name!r} has no Hugging Face counterpart")
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        except Exception as e:
            raise DnError(f"GGUF tensor {t.name!r} cannot be dequantised ({e.__class__.__name__})") from None
        w = w.reshape([int(d) for d in reversed(t.shape)]) if w.ndim == 1 and len(t.shape) > 1 else w
        if cfg["model_type"] == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg["num_attention_heads"] if "q_proj" in name else cfg["num_key_value_heads"]
            w = unpermute(w, heads)
        if progress:
            progress.update(1)
        yield name, safetensors_io.f32_to_bf16(w)


def tokenizer_files(reader) -> dict[str, str]:
    """tokenizer.json and tokenizer_config.json contents for a byte-level BPE ('gpt2') GGUF vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind = field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise DnError(f"GGUF tokenizer {kind!r} is not supported (dn converts byte-level BPE 'gpt2')")
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # token_type 3 = control, 4 = user defined: both must never be split by BPE.
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, ty in enumerate(types) if ty in (3, 4)])

    def special(key):
        i = field(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": special("bos"),
              "eos_token": special("eos"), "unk_token": special("unknown"), "pad_token": special("padding"),
              "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
              "model_max_length": 1 << 30}
    template = field(reader, "tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return {"tokenizer.json": tok.to_str(), "tokenizer_config.json": json.dumps(config, indent=1)}


def convert(gguf_path: Path, out_dir: Path, progress: bool = True) -> None:
    """Write the HF folder into out_dir (which the caller renames into place)."""
    from dn.spec import Architecture

    reader = open_gguf(gguf_path)
    cfg = hf_config(reader)
    arch = Architecture.from_hf_config(cfg)
    files = tokenizer_files(reader)
    bar = _bar(len(reader.tensors), f"converting {gguf_path.name}") if progress else None
    weights = {name: (bits, "BF16") for name, bits in tensors(reader, cfg, bar)}
    if bar:
        bar.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    safetensors_io.save(weights, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(arch.to_hf_config(), indent=1))
    gen = {"bos_token_id": arch.bos_token_id, "eos_token_id": arch.eos_token_id}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=1))
    for name, text in files.items():
        (out_dir / name).write_text(text)


def _bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", leave=False)
