"""OpenAI request bodies -> prompt ids and sampling parameters, checked field by field; a bad one is an ApiError with
the status code and the one-line JSON error a client expects. Unknown fields are ignored (clients send many)."""

from __future__ import annotations

import json
import math

from dn.core.errors import DnError
from dn.serve.engine import Params


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.kind, self.headers = status, message, code, kind, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "code": self.code}}


def bad(message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, code)


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"the body is not valid JSON ({e})", "invalid_json") from None
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object", "invalid_json")
    return body


def _get(body: dict, name: str, default, kinds: tuple, want: str, ok=lambda v: True):
    value = body.get(name)
    if value is None:
        return default
    # bool is an int in Python: refused where a number is wanted
    if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds) or not ok(value):
        raise bad(f"'{name}' must be {want}, got {json.dumps(value)[:60]}", "invalid_type")
    return value


def _number(body, name, default, lo, hi, want):
    return float(_get(body, name, default, (int, float), want, lambda v: math.isfinite(v) and lo <= v <= hi))


class Defaults:
    """The server's flags, the values a request leaves out."""

    def __init__(self, args):
        self.max_tokens, self.temp, self.top_p = args.max_tokens, args.temp, args.top_p
        self.min_p, self.top_k, self.system_prompt = args.min_p, args.top_k, args.system_prompt


def sampling(body: dict, d: Defaults, seed: int, context: int, prompt_len: int) -> Params:
    """The sampling fields; max_tokens over the context is refused, and cut to what is left of it after the
    prompt (finish_reason "length" then)."""
    _get(body, "n", 1, (int,), "1 (one choice per request)", lambda v: v == 1)
    max_tokens = _get(body, "max_completion_tokens", d.max_tokens, (int,), "a positive integer", lambda v: v >= 1)
    max_tokens = _get(body, "max_tokens", max_tokens, (int,), "a positive integer", lambda v: v >= 1)
    if max_tokens > context:
        raise bad(f"max_tokens {max_tokens} is over the model's context of {context} tokens", "max_tokens_too_large")
    if prompt_len >= context:
        raise bad(f"the prompt has {prompt_len} tokens; the model's context is {context}", "context_length_exceeded")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and len(stop) <= 16 and all(isinstance(s, str) for s in stop)):
        raise bad("'stop' must be a string or a list of at most 16 strings", "invalid_type")
    return Params(
        max_tokens=min(max_tokens, context - prompt_len),
        temp=_number(body, "temperature", d.temp, 0, 1e6, "a number >= 0"),
        top_p=_number(body, "top_p", d.top_p, 0, 1, "a number in [0, 1]"),
        min_p=_number(body, "min_p", d.min_p, 0, 1, "a number in [0, 1]"),
        top_k=_get(body, "top_k", d.top_k, (int,), "an integer >= 0", lambda v: v >= 0),
        seed=_get(body, "seed", seed, (int,), "an integer", lambda v: -2**63 <= v < 2**64) % 2**64,
        stop=stop or [])


def streaming(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = _get(body, "stream", False, (bool,), "true or false")
    opts = _get(body, "stream_options", {}, (dict,), "an object")
    return stream, _get(opts, "include_usage", False, (bool,), "true or false")


def _content(value, i: int) -> str:
    """A message's content: a string, or a list of text parts (OpenAI's content parts)."""
    if value is None or isinstance(value, str):
        return value or ""
    text = lambda p: isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
    if isinstance(value, list) and all(text(p) for p in value):
        return "".join(p["text"] for p in value)
    raise bad(f"messages[{i}].content must be a string or a list of text parts", "invalid_type")


def chat_ids(body: dict, tokenizer, system_prompt: str | None = None) -> list[int]:
    """The chat template over the messages; --system-prompt goes first where the request has no system message."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise bad("'messages' must be a list of messages", "invalid_type" if "messages" in body else "missing_field")
    if not messages:
        raise bad("'messages' is empty", "empty_messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a string 'role'", "invalid_type")
        clean.append({"role": m["role"], "content": _content(m.get("content"), i)})
    if system_prompt and not any(m["role"] == "system" for m in clean):
        clean.insert(0, {"role": "system", "content": system_prompt})
    if not tokenizer.chat_template:
        raise bad("this model has no chat template: use /v1/completions", "no_chat_template")
    try:
        text = tokenizer.apply_chat_template(clean)
    except DnError as e:
        raise bad(str(e), "chat_template_error") from None
    return tokenizer.encode(text, add_special_tokens=False)


def completion_ids(body: dict, tokenizer) -> list[int]:
    """'prompt': a string or token ids (or a list of one of them: one choice per request)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt) if prompt else []
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if any(not 0 <= t < tokenizer.vocab_size for t in prompt):
            raise bad("'prompt' has a token id outside the vocabulary", "invalid_value")
        ids = list(prompt)
    else:
        raise bad("'prompt' must be a string or a list of token ids", "invalid_type" if "prompt" in body
                  else "missing_field")
    if not ids:
        raise bad("'prompt' is empty", "empty_prompt")
    return ids
