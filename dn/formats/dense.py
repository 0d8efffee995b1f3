"""The dense format: a weight held as stored, at the compute dtype (the format object every other is compared to)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from dn.core.tensors import File


@dataclass
class Dense:
    """A dense weight (numpy: float32 values)."""
    name: ClassVar[str] = "dense"
    scratch: ClassVar[bool] = False
    w: np.ndarray

    @classmethod
    def nbytes(cls, shape, dtype_bytes: int) -> int:
        return math.prod(shape) * dtype_bytes

    @classmethod
    def from_stored(cls, f: File, name: str) -> Dense:
        return cls(f.read(name, "float32"))

    def dequantize(self) -> np.ndarray:
        return self.w

    def matmul(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float32) @ self.w.T

    def rows(self, idx) -> np.ndarray:
        return self.w[idx]
