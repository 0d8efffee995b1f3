"""One error type for everything a user can get wrong; the CLI prints it as one line."""

from __future__ import annotations

from contextlib import contextmanager


class DnError(Exception):
    """A user-facing failure: bad path, bad flag, corrupt file, unsupported model."""


@contextmanager
def reworded(messages: dict):
    """Turn the exceptions listed into a DnError (from None: the user reads one line, not a library's traceback).
    messages: exception type -> message, a string or a function of the exception; the first type (in order)
    that the exception is an instance of gives it, as in a chain of `except` clauses."""
    try:
        yield
    except tuple(messages) as e:
        message = next(m for kind, m in messages.items() if isinstance(e, kind))
        raise DnError(message(e) if callable(message) else message) from None
