"""The Python API, as mlx-lm's load/generate/stream_generate/convert; `import dn` reaches it as dn.load etc.

    import dn
    loaded = dn.load()                       # the default model; or a folder, .gguf or Hub repo id
    print(dn.generate(loaded, "Hello, who are you?", max_tokens=32))
    for r in dn.stream_generate(loaded, "Tell me a joke."):
        print(r.text, end="", flush=True)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from dn.model.sources import resolve_model
from dn.runtime import generation, loader, writer
from dn.runtime.generation import GenerationResponse, check_cache, prompt_ids
from dn.runtime.loader import Loaded

__all__ = ["GenerationResponse", "Loaded", "convert", "generate", "load", "stream_generate"]


def load(model: str | None = None, backend: str = "auto", dtype: str = "auto", max_resident: str | None = None,
         mode: str = "exact", calib_text: str | None = None, prefetch: bool = False, dense: bool = False) -> Loaded:
    """A model ready to generate (.model, .tokenizer, .backend, .spec, .memory, .dtype): what `dn generate` loads
    for the same --model, --backend, --dtype, --dense and residency flags (max_resident: '300MB', '25%' of dense
    bf16)."""
    return loader.load(model, backend, dtype, max_resident=max_resident, mode=mode, calib_text=calib_text,
                       prefetch=prefetch, dense=dense)


def stream_generate(loaded: Loaded, prompt: str | list[int], max_tokens: int = 128, *, temp: float = 0.0,
                    top_p: float = 1.0, min_p: float = 0.0, top_k: int = 0, seed: int = 0,
                    max_kv_size: int | None = None, kv_bits: int | None = None, raw: bool = False,
                    system_prompt: str | None = None) -> Iterator[GenerationResponse]:
    """One GenerationResponse per token, its .text the new piece. A str prompt gets the chat template as in
    `dn generate` (raw=True: not); a list is token ids, used as they are."""
    check_cache(kv_bits, max_kv_size)
    ids = prompt_ids(loaded.tokenizer, prompt, raw, system_prompt) if isinstance(prompt, str) else list(prompt)
    yield from generation.stream_generate(loaded, ids, max_tokens, temp, seed, top_p=top_p, min_p=min_p,
                                          top_k=top_k, max_kv_size=max_kv_size, kv_bits=kv_bits)


def generate(loaded: Loaded, prompt: str | list[int], max_tokens: int = 128, **kwargs) -> str:
    """The text stream_generate streams, whole (kwargs: stream_generate's); the same as `dn generate` prints."""
    return "".join(r.text for r in stream_generate(loaded, prompt, max_tokens, **kwargs))


def convert(model: str | None, out: str | Path, *, quantize: bool = False, q_bits: int | None = None,
            q_group_size: int | None = None, q_embedding_bits: int | None = None,
            q_embedding_group_size: int | None = None, codec: str | None = None, sparsity: float | None = None,
            calib_text: str | None = None, prior: str | None = None, router: str | None = None,
            select: str | None = None, seed: int = 0, backend: str = "auto") -> Path:
    """Write a new folder `out` from model (None: the default), as `dn convert` does with the same flags:
    quantize (mlx-lm's affine layout, q_bits 4 and q_group_size 64 by default), codec="lossless", and/or
    sparsity with its calibration text (a path; default $DN_CALIB_TEXT). Returns the folder."""
    q = (q_bits, q_group_size, q_embedding_bits, q_embedding_group_size) if quantize else None
    out, q, sparse_args = writer.checked(out, codec, q, sparsity, calib_text, prior, seed, backend, router, select)
    writer.convert(resolve_model(model, dense=True), out, codec, sparse_args, q)
    return out
