"""Convert a .gguf file into a Hugging Face folder (config.json, model.safetensors, tokenizer).

The native folder (the default) keeps every quantized tensor as the file's GGUF blocks (dn/formats/gguf_blocks.py:
Q4_0/1, Q5_0/1, Q8_0, Q2_K..Q6_K), uint8 [rows, row_bytes], its type in config.json's "gguf_quantization"; float
tensors as stored. The dense folder (on request) dequantises them with the `gguf` package into bf16. What
llama.cpp's converter changed is undone here: for llama it stores q/k rows permuted for its rope layout
(permuted back); for Gemma it stores every RMSNorm weight as 1 + w, since Gemma's norm computes
x * (1 + w) (1 is subtracted; q/k norms included). Gemma's rope is the HF layout already (no permutation).
The tokenizer is rebuilt with the `tokenizers` library: byte-level BPE ('gpt2') or, for Gemma, SentencePiece
BPE with byte fallback ('llama' vocabulary without merges: rebuilt from the tokens' order).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from dn.core import tensors
from dn.core.errors import DnError
from dn.core.progress import progress as progress_bar  # convert's `progress` is its on/off flag
from dn.formats import gguf_blocks
from dn.model.spec import Architecture

# gguf architecture -> HF model_type
ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}
NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
         "ffn_norm": "post_attention_layernorm", "attn_q_norm": "self_attn.q_norm",
         "attn_k_norm": "self_attn.k_norm"}
# Gemma 3's four norms per layer: ffn_norm is the pre-MLP norm there, not llama's post-attention one
GEMMA3_NAMES = NAMES | {"ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
                        "post_ffw_norm": "post_feedforward_layernorm"}
TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
       "output.weight": "lm_head.weight"}


def open_gguf(path: Path):
    import gguf  # late: the gguf package takes ~150 ms to import; only a .gguf needs it

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
    cfg = {
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
    return cfg | (gemma3_config(reader, get, cfg) if arch == "gemma3" else {})


def gemma3_config(reader, get, cfg: dict) -> dict:
    """What Gemma 3's config needs beyond llama's. llama.cpp's gemma3 code hard-codes what the GGUF lacks (a full
    attention layer every 6th, rope base 10000 on the sliding ones, the attention scale 1/sqrt(head_dim), but
    1/sqrt(hidden/heads) for the 62-layer 27B); keys a newer converter writes are read when present."""
    layers, head_dim = cfg["num_hidden_layers"], cfg["head_dim"]
    pattern = int(get("attention.sliding_window_pattern", 6))
    scalar = cfg["hidden_size"] // cfg["num_attention_heads"] if layers == 62 else head_dim
    out = {"hidden_activation": "gelu_pytorch_tanh", "sliding_window": int(get("attention.sliding_window")),
           "layer_types": ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)],
           "rope_local_base_freq": 10000.0, "query_pre_attn_scalar": scalar,
           "final_logit_softcapping": get("final_logit_softcapping", 0.0) or None,
           "attn_logit_softcapping": get("attn_logit_softcapping", 0.0) or None}
    kind = field(reader, "gemma3.rope.scaling.type")
    if kind not in (None, "none"):
        if kind != "linear":
            raise DnError(f"unsupported GGUF rope scaling {kind!r}")
        out["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    return out


def hf_name(name: str, model_type: str = "llama") -> str | None:
    if name in TOP:
        return TOP[name]
    names = GEMMA3_NAMES if model_type == "gemma3_text" else NAMES
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in names:
        return f"model.layers.{parts[1]}.{names[parts[2]]}.{parts[3]}"
    return None


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (pairs interleaved -> halves)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


FLOATS = {"F32": "F32", "F16": "F16", "BF16": "BF16"}  # GGUF float types -> safetensors dtype, kept as they are


def _named(reader, cfg: dict):
    """(hf name, gguf tensor) for every tensor; one line for a tensor with no counterpart."""
    for t in reader.tensors:
        name = hf_name(t.name, cfg["model_type"])
        if name is None:
            raise DnError(f"GGUF tensor {t.name!r} has no Hugging Face counterpart")
        yield name, t


def _undo(name: str, w: np.ndarray, cfg: dict) -> np.ndarray:
    """What llama.cpp's converter changed, undone on rows (dense values or whole rows of blocks alike): llama's q/k
    row permutation and Gemma's 1 + w norms (norms are always float)."""
    if cfg["model_type"] == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
        w = unpermute(w, cfg["num_attention_heads"] if "q_proj" in name else cfg["num_key_value_heads"])
    if cfg["model_type"] == "gemma3_text" and name.endswith("norm.weight"):
        w = np.asarray(w, np.float32) - np.float32(1)  # llama.cpp stored 1 + w
    return w


def _checked_data(t):
    """The tensor's data, its size checked against the file (a truncated GGUF gives one line, not a crash later)."""
    try:
        data = t.data
        if data.nbytes != int(t.n_bytes):
            raise ValueError("short read")
        return data
    except (ValueError, OSError) as e:
        raise DnError(f"GGUF tensor {t.name!r} cannot be read ({e.__class__.__name__}: the file may be truncated)") \
            from None


def hf_tensors(reader, cfg: dict, progress=None):
    """Yield (hf_name, bf16 bits) for every tensor, dequantised (the dense widening)."""
    from gguf.quants import dequantize  # late: as in open_gguf

    for name, t in _named(reader, cfg):
        try:
            w = np.asarray(dequantize(_checked_data(t), t.tensor_type), dtype=np.float32)
        except DnError:
            raise
        except Exception as e:
            raise DnError(f"GGUF tensor {t.name!r} cannot be dequantised ({e.__class__.__name__})") from None
        w = w.reshape([int(d) for d in reversed(t.shape)]) if w.ndim == 1 and len(t.shape) > 1 else w
        if progress:
            progress.update(1)
        yield name, tensors.f32_to_bf16(_undo(name, w, cfg))


def native_tensors(reader, cfg: dict, progress=None):
    """Yield (hf_name, (array, safetensors dtype), block type or None) with every quantized tensor kept as its
    GGUF blocks, uint8 [rows, row_bytes] (the file's bytes, rows in HF order), and float tensors as stored."""
    for name, t in _named(reader, cfg):
        kind = t.tensor_type.name
        if kind in FLOATS:
            w = _undo(name, _checked_data(t), cfg)
            yield name, (np.asarray(w), "F32" if w.dtype == np.float32 else FLOATS[kind]), None
        else:
            try:
                kind = gguf_blocks.type_name(kind)
            except DnError:
                raise DnError(f"GGUF tensor {t.name!r} has block type {kind}, which dn does not read "
                              f"(dn reads {', '.join([*FLOATS, *gguf_blocks.TYPES])})") from None
            raw = _checked_data(t)
            if len(t.shape) != 2 or raw.ndim != 2:
                raise DnError(f"GGUF tensor {t.name!r}: a {kind} tensor of {len(t.shape)} dimensions")
            yield name, (np.ascontiguousarray(_undo(name, raw, cfg)), "U8"), kind
        if progress:
            progress.update(1)


CONVERSION = 2  # in every conversion's cache key: 2 split text as tokenizer.ggml.pre says (1 split all as GPT-2)

# tokenizer.ggml.pre -> how the text is split before BPE, as the model's own tokenizer.json (and llama.cpp's
# llama-vocab.cpp) splits it: Qwen2's and Llama 3's regexes take digits one (or up to three) at a time, SmolLM's
# splits digits first; GPT-2's regex (ByteLevel's own) is the rest's.
_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}%s"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_REGEX_PRE = {"qwen2": _SPLIT % "", "llama-bpe": _SPLIT % "{1,3}"}
_NFC_PRE = {"qwen2"}


def pre_tokenizer(pre: str | None):
    """The pre-tokenizer of a byte-level BPE vocabulary named by tokenizer.ggml.pre (GPT-2's for gpt2, default and
    names not listed)."""
    if pre in _REGEX_PRE:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_REGEX_PRE[pre]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def byte_level_tokenizer(reader, tokens: list[str], types: list[int]):
    """A byte-level BPE ('gpt2') vocabulary with its merges, split as tokenizer.ggml.pre says (pre_tokenizer)."""
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    pre = field(reader, "tokenizer.ggml.pre")
    if pre in _NFC_PRE:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    # token_type 3 = control, 4 = user defined: both must never be split by BPE.
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, ty in enumerate(types) if ty in (3, 4)])
    return tok


def gemma_tokenizer(reader, tokens: list[str], types: list[int]):
    """Gemma's SentencePiece BPE as HF's GemmaTokenizer builds it (spaces as U+2581, no prefix space, byte
    fallback), from a GGUF that lists no merges. Two things of llama.cpp's file are undone (as transformers'
    GGUF loader does): tokens of only spaces are stored as real spaces (respelled as U+2581 runs), and the
    merges are rebuilt from the vocabulary ranked by the tokens' order in the file (Gemma's scores do not follow
    its merge order). The text starts with <bos> (tokenizer.ggml.add_bos_token)."""
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = tokens[field(reader, "tokenizer.ggml.unknown_token_id", 3)]
    tok = Tokenizer(models.BPE(vocab, sp_merges(tokens, vocab), fuse_unk=True, unk_token=unk, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4])
    bos = field(reader, "tokenizer.ggml.bos_token_id")
    if bos is not None and field(reader, "tokenizer.ggml.add_bos_token", True):
        b = tokens[bos]
        tok.post_processor = processors.TemplateProcessing(single=f"{b} $A", pair=f"{b} $A {b} $B",
                                                           special_tokens=[(b, bos)])
    return tok


def sp_merges(tokens: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges a SentencePiece vocabulary implies: every split of a token into two tokens, the earlier the
    merged token in the file the higher the rank; ties: the longer left piece first, then ids (transformers'
    generate_merges with the file order as the score)."""
    merges = []
    for i, t in enumerate(tokens):
        pairs = [(t[:k], t[k:]) for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab]
        merges += [(i, -len(a), -len(b), vocab[a], vocab[b], a, b) for a, b in pairs]
    merges.sort(key=lambda m: m[:5])
    return [(m[5], m[6]) for m in merges]


def tokenizer_files(reader) -> dict[str, str]:
    """tokenizer.json and tokenizer_config.json contents for a byte-level BPE ('gpt2') or Gemma ('llama' model
    of a gemma3 GGUF) vocabulary."""
    kind = field(reader, "tokenizer.ggml.model")
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    if kind == "gpt2":
        tok = byte_level_tokenizer(reader, tokens, types)
    elif kind == "llama" and field(reader, "general.architecture") == "gemma3":
        tok = gemma_tokenizer(reader, tokens, types)
    else:
        raise DnError(f"GGUF tokenizer {kind!r} is not supported (dn converts byte-level BPE 'gpt2' and Gemma's "
                      "SentencePiece)")

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


def convert(gguf_path: Path, out_dir: Path, progress: bool = True, dense: bool = False) -> None:
    """Write the HF folder into out_dir (which the caller renames into place): by default the native folder (every
    quantized tensor kept as its GGUF blocks, config.json's "gguf_quantization" naming each one's type); dense=True
    the bf16 widening."""
    reader = open_gguf(gguf_path)
    cfg = hf_config(reader)
    arch = Architecture.from_hf_config(cfg)
    files = tokenizer_files(reader)
    bar = progress_bar(len(reader.tensors), f"{'widening' if dense else 'reading'} {gguf_path.name}", "tensor") \
        if progress else None
    config = arch.to_hf_config()
    if dense:
        weights = {name: (bits, "BF16") for name, bits in hf_tensors(reader, cfg, bar)}
    else:
        weights, types = {}, {}
        for name, stored, kind in native_tensors(reader, cfg, bar):
            weights[name] = stored
            if kind:
                types[name.removesuffix(".weight")] = kind
        config["gguf_quantization"] = types
    if bar:
        bar.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors.save(weights, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=1))
    gen = {"bos_token_id": arch.bos_token_id, "eos_token_id": arch.eos_token_id}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=1))
    for name, text in files.items():
        (out_dir / name).write_text(text)
