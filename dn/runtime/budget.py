"""The memory budget, parsed once: `--max-resident SIZE` (generate, eval, footprint, the loader) and the `@BUDGET`
of a dn bench configuration. A budget is a share of the model's dense bf16 weights (`25%`) or a size in bytes.

Two grammars, one value: `--max-resident` takes `300MB`, `1.5GiB`, `4096` (bytes) or `25%`, in any case, spaces
allowed; bench's configuration names (strict) take only `25%` (in (0, 100]) or `512MiB`, `1.5GiB`, `100000000B`,
so that a budget names one configuration."""

from __future__ import annotations

import re
from dataclasses import dataclass

from dn.core.errors import DnError

_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*(%|[kKmMgG]i?[bB]|[bB])?\s*")
_STRICT = re.compile(r"(?P<num>\d+(?:\.\d+)?)(?P<unit>%|B|KiB|MiB|GiB)")
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass(frozen=True)
class Budget:
    text: str            # normalized: number and unit as given, no spaces ("25%", "512MiB")
    value: float
    unit: str            # "%" or a key of _UNITS

    @property
    def fraction(self) -> float | None:
        """The share of dense bf16 (0.25 for 25%), None for a size."""
        return self.value / 100 if self.unit == "%" else None

    def bytes(self, dense_bf16: int) -> int:
        """Bytes, given the model's dense bf16 weights (what a percentage is of)."""
        return int(self.value / 100 * dense_bf16 if self.unit == "%" else self.value * _UNITS[self.unit])


def parse(text: str, strict: bool = False) -> Budget:
    """`--max-resident`'s grammar, or with strict bench's (see the module's docstring). Raises DnError."""
    if strict:
        m = _STRICT.fullmatch(text.strip())
        if not m or float(m["num"]) <= 0 or (m["unit"] == "%" and float(m["num"]) > 100):
            raise DnError(f"bad residency budget {text!r} (expected a percentage in (0, 100] such as 25%, "
                          "or a size such as 512MiB)")
        return Budget(m["num"] + m["unit"], float(m["num"]), m["unit"].lower() if m["unit"] != "%" else "%")
    m = _SIZE.fullmatch(str(text))
    if not m:
        raise DnError(f"--max-resident: expected a size like 300MB, 1.5GiB or 25%, got {text!r}")
    value, unit = float(m.group(1)), m.group(2) or ""
    if value <= 0:
        raise DnError(f"--max-resident must be positive, got {text!r}")
    return Budget(m.group(1) + unit, value, unit.lower() or "b")


def parse_budget(text: str, dense_bf16: int) -> int:
    """'300MB', '1.5GiB', '123456' (bytes) or '25%' (of the model's dense bf16 weights) -> bytes."""
    b = parse(text)
    if b.unit == "%" and dense_bf16 <= 0:
        raise DnError(f"--max-resident must be positive, got {text!r}")
    return b.bytes(dense_bf16)


def parse_size(text: str, flag: str) -> int:
    """A byte size (256MiB, 1GB, 1000000) for a flag that takes no percentage -> bytes. Raises DnError naming flag."""
    try:
        b = parse(text)
    except DnError:
        b = None
    if b is None or b.unit == "%":
        raise DnError(f"{flag}: expected a size like 256MiB, 1GB or 1000000, got {text!r}")
    return b.bytes(0)
