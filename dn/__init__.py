"""dreamnova: run large language models in a fraction of their memory (backend-neutral core)."""

__version__ = "0.1.0"
