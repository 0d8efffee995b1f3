"""Model argument -> folder -> spec -> backend model + tokenizer: the steps every verb shares."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dn.core import tensors as safetensors_io
from dn.model.sources import resolve_model
from dn.model.spec import ModelSpec, load_spec
from dn.model.tokenizer import Tokenizer
from dn.runtime import backend as backends
from dn.runtime import memory


@dataclass
class Loaded:
    model_dir: Path
    spec: ModelSpec
    backend: Any
    model: Any
    dtype: str
    tokenizer: Tokenizer
    memory: dict  # what the load added, measured by the platform (dn.runtime.memory.measure_load)


    residency: Any = None  # dn.runtime.residency.Runtime when loaded under --max-resident


def load(model: str | None, backend: str = "auto", dtype: str = "float32", max_resident: str | None = None,
         mode: str = "exact", calib_text: str | None = None, prefetch: bool = False) -> Loaded:
    """max_resident: a budget ('300MB', '25%' of dense bf16): the MLPs are held by dn.runtime.residency under it."""
    be = backends.resolve(backend)  # first, so a missing backend fails before any conversion
    model_dir = resolve_model(model)
    spec = load_spec(model_dir)
    safetensors_io.check_folder(model_dir)
    tokenizer = Tokenizer(model_dir, spec.architecture.eos_token_id)
    runtime = None
    if max_resident is not None:
        from dn.runtime import residency

        budget = residency.parse_budget(max_resident, residency.dense_bf16(spec))
        model_dir, spec = residency.store_for(model_dir, spec, dtype, budget, mode)
        runtime = residency.open_runtime(be, model_dir, spec, dtype, budget, mode, calib_text, prefetch)
    handle, measured = memory.measure_load(be, model_dir, spec, dtype, residency=runtime)
    return Loaded(model_dir, spec, be, handle, dtype, tokenizer, measured, runtime)
