"""Tokenizer and chat template from a model folder, with the `tokenizers` library and jinja2.

dn/ stays free of torch: transformers' AutoTokenizer would import it.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from dn.core.errors import DnError


class Tokenizer:
    def __init__(self, model_dir: Path, eos_token_id=None):
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise DnError(f"{model_dir}: no tokenizer.json (dn needs a fast tokenizer file)")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception on malformed files
            raise DnError(f"{path}: unreadable tokenizer ({str(e)[:80]})") from None
        config = _read_json(model_dir / "tokenizer_config.json")
        self.chat_template = config.get("chat_template")
        jinja = model_dir / "chat_template.jinja"
        if not self.chat_template and jinja.is_file():
            self.chat_template = jinja.read_text()
        if isinstance(self.chat_template, list):  # named templates: take the default one
            self.chat_template = next((t["template"] for t in self.chat_template if t.get("name") == "default"),
                                      None)
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.eos_ids = self._eos_ids(model_dir, eos_token_id)
        self.bos_id = self._bos_id()

    def _bos_id(self) -> int | None:
        """The token encode() puts before every text (Gemma's <bos>), else None: read from what the post-processor
        does, which is what encode() does whatever tokenizer_config says."""
        plain = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a").ids
        return full[0] if len(full) == len(plain) + 1 and full[1:] == plain else None

    def _eos_ids(self, model_dir: Path, eos_token_id) -> set[int]:
        ids = set()
        gen = _read_json(model_dir / "generation_config.json").get("eos_token_id")
        for v in (eos_token_id, gen):
            ids |= set(v) if isinstance(v, list) else ({v} if isinstance(v, int) else set())
        if self.eos_token is not None and self._tok.token_to_id(self.eos_token) is not None:
            ids.add(self._tok.token_to_id(self.eos_token))
        return ids

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise DnError("this model has no chat template")
        # late: jinja2 costs ~100 ms of imports; only chat templates need it
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment  # late: as jinja2 above

        def raise_exception(msg):
            raise TemplateError(msg)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: datetime.now().strftime(fmt))
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except TemplateError as e:
            raise DnError(f"chat template failed: {e}") from None


class StreamDecoder:
    """Turns a growing token list into text deltas, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta, self.emitted = text[len(self.emitted):], text
        return delta


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DnError(f"{path}: unreadable ({e.__class__.__name__})") from None
    return data if isinstance(data, dict) else {}


def _token_text(tok) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok
