"""One error type for everything a user can get wrong; the CLI prints it as one line."""


class DnError(Exception):
    """A user-facing failure: bad path, bad flag, corrupt file, unsupported model."""
