"""Model argument -> folder -> spec -> backend model + tokenizer: the steps every verb shares. Under a budget, the
format the folder is held in is chosen here (store_for): residency plans, the loader picks what it plans on."""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dn.core import tensors
from dn.core.errors import DnError
from dn.core.files import cache_dir, one_at_a_time
from dn.formats import quant
from dn.model import store
from dn.model.sources import resolve_model
from dn.model.spec import ModelSpec, load_spec, weight_files
from dn.model.tokenizer import Tokenizer
from dn.runtime import backend as backends
from dn.runtime import memory, residency, threads, writer
from dn.runtime.budget import parse_budget


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


def compute_dtype(be, spec: ModelSpec) -> str:
    """`--dtype auto`: the model's own bfloat16 where the device computes it natively (Metal, CUDA/ROCm, MLX's GPU);
    on a CPU the dtype the fast kernels of the store's formats need (torch's affine int4/int8: bfloat16), else
    float32: the slow path is never the default."""
    if be.device_name().split(":")[0] in ("metal", "cuda", "gpu"):
        return "bfloat16"
    want = {be.ops.CPU_DTYPES.get(e.format) for e in store.entries(spec)} - {None}
    return want.pop() if len(want) == 1 else "float32"


def load(model: str | None, backend: str = "auto", dtype: str = "auto", max_resident: str | None = None,
         mode: str = "exact", calib_text: str | None = None, prefetch: bool = False, dense: bool = False,
         stage=None) -> Loaded:
    """max_resident: a budget ('300MB', '25%' of dense bf16): the MLPs are held by dn.runtime.residency under it.
    dtype "auto": compute_dtype. dense: a GGUF widened to bf16 rather than its blocks as they are. stage: a
    dn.runtime.pipeline.Stage: only its layers are read."""
    threads.setup()  # before the backend loads torch (OpenMP reads its settings once)
    be = backends.resolve(backend)  # first, so a missing backend fails before any conversion
    model_dir, spec = folder(model, be, dense, max_resident is not None)
    dtype = compute_dtype(be, spec) if dtype == "auto" else dtype
    tensors.check_folder(model_dir)
    tokenizer = Tokenizer(model_dir, spec.architecture.eos_token_id)
    runtime = None
    if max_resident is not None:
        budget = parse_budget(max_resident, residency.dense_bf16(spec, stage))  # a rank's %: of its own share
        model_dir, spec = store_for(model_dir, spec, dtype, budget, mode, stage)
        runtime = residency.open_runtime(be, model_dir, spec, dtype, budget, mode, calib_text, prefetch, stage)
    with tensors.reading(model_dir):  # a bar over the bytes read, on a terminal and for a long load only
        handle, measured = memory.measure_load(be, model_dir, spec, dtype, residency=runtime, stage=stage)
    return Loaded(model_dir, spec, be, handle, dtype, tokenizer, measured, runtime)


def folder(model: str | None, be, dense: bool = False, budget: bool = False) -> tuple[Path, ModelSpec]:
    """The folder (and spec) a run reads: a GGUF's native folder, or its bf16 widening where asked (dense) or where
    a budget is planned by a backend that plans over dense or affine stores only (docs/native.md). Pipeline ranks
    split by it (dn.runtime.pipeline.split_for)."""
    model_dir = resolve_model(model, dense=dense)
    spec = load_spec(model_dir)
    if spec.gguf and budget and not getattr(be.resident, "GGUF", False):
        model_dir = resolve_model(model, dense=True)
        spec = load_spec(model_dir)
        if spec.gguf:
            raise DnError(f"{model_dir}: --max-resident needs the .gguf file (or a dense folder), not its native "
                          "folder")
    return model_dir, spec


# ---- the format a budget needs ------------------------------------------------------------------------

def quantization_error(model_dir: Path, spec: ModelSpec, bits: int, group_size: int) -> float:
    """Relative RMS error of affine `bits`-bit groups of `group_size` on the first and last layer's linear
    weights (inf where the group size does not divide them)."""
    last = spec.architecture.num_hidden_layers - 1
    want = {t.name for t in spec.tensors if t.role in ("mlp", "attention") and len(t.shape) == 2
            and (".layers.0." in t.name or f".layers.{last}." in t.name)}
    err = ref = 0.0
    for f in weight_files(model_dir):
        for _, (a, dt) in tensors.load(f, mmap=False, names=want).items():
            w = tensors.to_float32(a, dt)
            if w.shape[1] % group_size:
                return float("inf")
            err += float(np.sum((quant.dequantize(*quant.quantize(w, bits, group_size), bits, group_size) - w) ** 2))
            ref += float(np.sum(w ** 2))
    return (err / ref) ** 0.5 if ref else float("inf")


def store_for(model_dir: Path, spec: ModelSpec, dtype: str, budget: int, mode: str,
              stage=None) -> tuple[Path, ModelSpec]:
    """The planner's choice of format for a dense folder whose budget its own format cannot meet: the cheapest
    that holds quality. 4-bit groups of 32 with an 8-bit embedding when that loses no more than 8-bit groups of 64
    would (the weights already lie on its grid: the default model, dequantized from Q4_1, 0.14% against 0.48%),
    else 8-bit groups of 64 (+0.1% on the default model, docs/formats.md). Converted once into the dn cache;
    other folders are used as they are."""
    if spec.quant is not None or spec.codec is not None or spec.sparse is not None or spec.gguf:
        return model_dir, spec
    try:
        residency.make_plan(spec, dtype, budget, mode, residency.block_bytes(spec, dtype), stage=stage)
        return model_dir, spec
    except DnError:
        pass
    four = quantization_error(model_dir, spec, 4, 32) <= quantization_error(model_dir, spec, 8, 64)
    fmt, q = ("q4g32e8", writer.quantization(4, 32, 8, 32)) if four else ("q8g64", writer.quantization(8, 64))
    key = hashlib.sha256(f"{Path(model_dir).resolve()}:{residency.fingerprint(model_dir, spec)}:".encode() + b"".join(
        str(f.stat().st_mtime_ns).encode() for f in sorted(Path(model_dir).glob("*.safetensors")))).hexdigest()[:16]
    out = cache_dir() / "residency-stores" / f"{key}-{fmt}"
    with one_at_a_time(out):  # pipeline ranks on one host: one converts, the others find it
        if not (out / "config.json").is_file():
            print(f"dn: the budget needs a smaller format than {model_dir.name}'s: storing it as {fmt} in {out}",
                  file=sys.stderr)
            writer.convert(model_dir, out, None, None, quant=q)
    return out, load_spec(out)
