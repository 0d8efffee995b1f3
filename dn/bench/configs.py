"""dn bench's configuration grammar, `FORMAT[+sparseNN][@BUDGET]`, and its flags' value lists.

- FORMAT: `dense`, the model's dense form (a GGUF's bf16 widening: resolve_model(model, dense=True)), from which
  every other format but native is converted; `native`, the model as it loads by default (a GGUF's own quantized
  blocks: resolve_model(model)); `lossless` (dn's codec); `q<B>[g<G>][e<E>]`, mlx-lm's affine quantization with B
  bits in groups of G (default 64), the embedding at E bits when given (`q4g32e8`), else at B;
- `+sparseNN`: the per-token sparse MLP skipping NN% of the neurons (`sparse50` alone is dense+sparse50);
- `@BUDGET`: a residency budget, dn.runtime.budget's strict grammar (`@25%` of dense bf16, or `@512MiB`).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

from dn.core.errors import DnError
from dn.formats import quant
from dn.runtime import budget as residency_budget
from dn.runtime.backend import DTYPES

DEFAULT_CONFIGS = "dense,native,q8,q4g32e8,q4g32,q4g64,q3g32,lossless,sparse50,q4g32+sparse50"
TASKS = ("humaneval",)
SKIPS = ("ppl", "agreement", "dense")  # --skip: phases a random-weight model (benchmarks/bench_shapes.py) has no use
# for; dense: the baseline record (a 1.5B GGUF's widening is 3 GB, its records against a peer need no dense)

_FORMAT = r"dense|native|lossless|q(?P<bits>\d+)(?:g(?P<group>\d+))?(?:e(?P<emb>\d+))?"
_CONFIG = re.compile(rf"(?:(?P<fmt>{_FORMAT})(?:\+sparse(?P<sparse>\d+))?|sparse(?P<alone>\d+))(?:@(?P<budget>.*))?")


@dataclass(frozen=True)
class Config:
    name: str                      # as given: the record's "config"
    fmt: str = "dense"             # dense | native | lossless | q<B>g<G>[e<E>] (canonical)
    bits: int | None = None
    group: int | None = None
    emb_bits: int | None = None
    sparsity: int | None = None    # percent of the MLP's neurons skipped per token
    budget: str | None = None      # residency budget ("25%", "512MiB")

    @property
    def stored(self) -> str:
        """The folder it runs: the configuration without its budget."""
        if not self.sparsity:
            return self.fmt
        return f"sparse{self.sparsity}" if self.fmt == "dense" else f"{self.fmt}+sparse{self.sparsity}"

    @property
    def source(self) -> str:
        """The folder it is made from: native's own, or the dense form every other format is converted from."""
        return "native" if self.fmt == "native" else "dense"

    def convert_args(self) -> list[str] | None:
        """`dn convert` flags that make its folder from its source (None: the source itself)."""
        args = {"dense": [], "native": [], "lossless": ["--codec", "lossless"]}.get(self.fmt)
        if args is None:
            args = ["-q", "--q-bits", str(self.bits), "--q-group-size", str(self.group)]
            args += ["--q-embedding-bits", str(self.emb_bits)] if self.emb_bits else []
        if self.sparsity:
            args = args + ["--sparsity", str(self.sparsity / 100)]
        return args or None


def _unknown(text: str, why: str = "") -> DnError:
    return DnError(f"unknown config {text!r}{why} (expected FORMAT[+sparseNN][@NN%]: FORMAT dense, native, lossless or "
                   "q<bits>[g<group>][e<embedding bits>], e.g. q4g32+sparse50@25%)")


def parse_budget(text: str) -> str:
    """`25%` (of the model's dense bf16 weights, as --max-resident) or a size (`512MiB`, `1.5GiB`, `100000000B`)."""
    return residency_budget.parse(text, strict=True).text


def parse_config(text: str) -> Config:
    name = text.strip()
    m = _CONFIG.fullmatch(name)
    if not m:
        raise _unknown(name)
    fmt, bits, group, emb = m["fmt"] or "dense", None, None, None
    if m["bits"]:
        bits, group, emb = int(m["bits"]), int(m["group"] or 64), int(m["emb"]) if m["emb"] else None
        try:
            quant.check(bits, group)
            if emb:
                quant.check(emb, group, " for the embedding")
        except DnError as e:
            raise _unknown(name, f": {e}") from None
        fmt = f"q{bits}g{group}" + (f"e{emb}" if emb else "")
    sparsity = m["sparse"] or m["alone"]
    if sparsity is not None and not 1 <= int(sparsity) <= 99:
        raise _unknown(name, ": sparsity is a percentage from 1 to 99")
    budget = None if m["budget"] is None else parse_budget(m["budget"])
    return Config(name, fmt, bits, group, emb, int(sparsity) if sparsity else None, budget)


def parse_configs(text: str, max_resident: str | None = None) -> list[Config]:
    """The --configs list, dense first (every ratio is against it), each once; --max-resident adds every budget
    to every configuration that has none."""
    configs = [parse_config(c) for c in text.split(",") if c.strip()]
    if not configs:
        raise DnError("--configs is empty")
    budgets = [parse_budget(b) for b in max_resident.split(",") if b.strip()] if max_resident else []
    dense = [c for c in configs if c.fmt == "dense" and not c.sparsity and not c.budget] or [parse_config("dense")]
    out, seen = [], set()
    for c in dense[:1] + configs:
        if (c.stored, c.budget) not in seen:
            seen.add((c.stored, c.budget))
            out.append(c)
    return out + [parse_config(f"{c.name}@{b}") for b in budgets for c in out if c.budget is None]


def over_gguf(configs: list[Config], named: set[str]) -> tuple[list[Config], list[str]]:
    """(the configurations a GGUF's native folder can run today, those left out): native composed with a sparse MLP
    cannot run over GGUF blocks yet (a budget can: torch plans over the blocks, MLX over the file's widening): one
    line for one the user named (named: --configs' items), left out when --max-resident added it."""
    later = [c for c in configs if c.fmt == "native" and c.sparsity]
    for c in later:
        if c.name in named:
            raise DnError(f"config {c.name!r}: the sparse MLP is fitted over dense or affine weights, not over a "
                          f"GGUF's blocks yet (try {c.name.replace('native', 'q4g32e8', 1)})")
    return [c for c in configs if c not in later], [c.name for c in later]


def keyed(text: str, flag: str, cast) -> dict:
    """`32,lossless:4,mlx:8` -> {"": 32, "lossless": 4, "mlx": 8}: a default, and values for a configuration or
    a backend by name (`torch:4096,mlx:1024`: no default, each record's backend or config must be named)."""
    out = {}
    for item in text.split(","):
        key, _, value = item.strip().rpartition(":")
        try:
            out[key] = cast(value.strip())
        except (ValueError, argparse.ArgumentTypeError):
            raise DnError(f"{flag}: bad value {item.strip()!r}") from None
    return out


def pick(table: dict, config: Config, backend: str, flag: str = "value"):
    """A keyed value for one record: by configuration name, then its stored format, then backend, else default."""
    for key in (config.name, config.stored, config.fmt, backend, ""):
        if key in table:
            return table[key]
    raise DnError(f"{flag} has no value for {config.name} on {backend} (give a default: a value without NAME:)")


def dtype_list(text: str) -> tuple[str, ...]:
    """A --dtypes value: dtypes joined by + (ValueError otherwise, for keyed)."""
    out = tuple(d for d in text.split("+") if d)
    if not out or any(d not in DTYPES for d in out):
        raise ValueError(text)
    return out


def positive_count(text: str) -> int:
    """A positive integer (ValueError otherwise, for keyed)."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def name_list(text: str, allowed, what: str) -> list[str]:
    """A comma-separated list of names from allowed (DnError naming the first other one)."""
    out = [t.strip() for t in text.split(",") if t.strip()]
    for t in out:
        if t not in allowed:
            raise DnError(f"{what} {t!r} (choose from {', '.join(allowed)})")
    return out
