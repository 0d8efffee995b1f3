"""The gated MLP's activations, one table for all of dn: y = D (act(G x) * (U x)) with act "silu" (SwiGLU: Llama,
SmolLM2, Qwen) or "gelu_tanh" (GeGLU, GELU's tanh approximation: Gemma).

ACTS maps dn's name to its number in the C kernels (dn/formats/csrc/dn_kernels.h's ACT_* defines; a test parses the
header and holds them equal) and its numpy function (the reference every backend is tested against); HF maps
config.json's names to dn's. Backends map dn's names to their own framework's functions.
"""

from __future__ import annotations

import numpy as np

from dn.core.errors import DnError


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (torch's approximate="tanh", transformers' gelu_pytorch_tanh)."""
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


# dn's name -> (the C kernels' number, the numpy function)
ACTS = {"silu": (0, silu), "gelu_tanh": (1, gelu_tanh)}
NAMES = tuple(ACTS)
DEFAULT = "silu"
# config.json's hidden_act / hidden_activation -> dn's name (transformers' ACT2FN keys)
HF = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
      "gelu_tanh": "gelu_tanh"}


def check(name: str, where: str = "") -> str:
    """name, when dn runs it; DnError otherwise, its message prefixed by where (say, the file it came from)."""
    if name not in ACTS:
        raise DnError(f"{where}unknown activation {name!r} (choose from {', '.join(NAMES)})")
    return name


def kind(name: str) -> int:
    """The C kernels' number for an activation."""
    return ACTS[check(name)][0]


def apply(name: str, x: np.ndarray) -> np.ndarray:
    """The activation by dn's name, in numpy."""
    return ACTS[check(name)][1](x)


def of_hf(name: str) -> str:
    """config.json's activation name -> dn's; DnError for one dn does not run."""
    if name not in HF:
        raise DnError(f"unsupported MLP activation {name!r} (dn runs: {', '.join(sorted(HF))})")
    return HF[name]

