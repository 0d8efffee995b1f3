"""dreamnova: run large language models in a fraction of their memory (backend-neutral core).

The Python API (dn/api.py) as mlx-lm's: dn.load, dn.generate, dn.stream_generate, dn.convert. It is imported on
first use, so `import dn` (which every dn.* import runs first) stays cheap and no layer below imports it."""

import importlib
import sys
import types

from dn.core import __version__

API = ("load", "generate", "stream_generate", "convert", "GenerationResponse", "Loaded")
__all__ = ["__version__", *API]


def __getattr__(name: str):
    if name in API:
        return getattr(importlib.import_module("dn.api"), name)
    raise AttributeError(f"module 'dn' has no attribute {name!r}")


class _Package(types.ModuleType):
    """dn.generate and dn.convert are the API's functions, as in mlx-lm, though dn/generate.py and dn/convert.py
    are verb modules: importing one must not rebind the name (the module stays in sys.modules, for
    `from dn.generate import ...`)."""

    def __setattr__(self, name, value):
        if not (name in API and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
