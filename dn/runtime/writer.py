"""Model folders written from a model folder, below the verbs: `convert` (dn convert's work, and the folders
dn.runtime.loader stores for a budget) writes a folder plain, lossless-coded (dn.formats.lossless) or affine-quantized
in mlx-lm's layout (dn.formats.quant), and/or sparse (dn.runtime.calibrate). Everything is written into a temporary
folder beside the destination and renamed at the end, so an interrupted or failed run leaves nothing behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from dn.core import tensors
from dn.core.errors import DnError
from dn.core.files import atomic_dir
from dn.core.progress import progress as progress_bar  # write_lossless's `progress` is its on/off flag
from dn.core.text import read_text, text_path
from dn.formats import lossless, quant
from dn.model.spec import COPY, inventory, load_spec, read_config, weight_files
from dn.runtime import calibrate

EMBEDDING = "model.embed_tokens"   # module path of the embedding (the lm_head too when tied)


def copy_side_files(src: Path, dst: Path) -> None:
    for name in COPY:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def copy_dense(src: Path, dst: Path) -> None:
    copy_side_files(src, dst)
    for f in sorted(src.glob("*.safetensors")):
        shutil.copy2(f, dst / f.name)


def quantization(bits, group_size, embedding_bits=None, embedding_group_size=None) -> dict:
    """-q's "quantization" dict as mlx-lm writes it: global parameters (mlx-lm's defaults: 4 bits, groups of
    64) plus the embedding's own entry when it differs."""
    bits, group_size = (4 if bits is None else bits), (64 if group_size is None else group_size)
    emb = (bits if embedding_bits is None else embedding_bits,
           group_size if embedding_group_size is None else embedding_group_size)
    quant.check(bits, group_size)
    quant.check(*emb)
    q = quant.params(bits, group_size)
    return q if emb == (bits, group_size) else q | {EMBEDDING: quant.params(*emb)}


def checked(out: str | Path, codec: str | None, q: tuple | None, sparsity: float | None, calib_text: str | None,
            prior: str | None, seed: int, backend: str, router: str | None, select: str | None
            ) -> tuple[Path, dict | None, dict | None]:
    """What dn convert and dn.convert check before any work: codec and quantization don't combine, q (bits,
    group size, embedding bits, embedding group size; None: not quantized) is valid, out is a new folder in an
    existing one, the calibration text (a path; default $DN_CALIB_TEXT) is read.
    -> (out, the "quantization" dict, convert's sparse_args)."""
    if q is not None and codec:
        raise DnError("lossless coding of quantized weights is not supported (choose -q or --codec lossless)")
    q = quantization(*q) if q is not None else None
    out = Path(out).expanduser()
    if out.exists():
        raise DnError(f"{out} already exists (dn convert writes a new folder)")
    if not out.parent.is_dir():
        raise DnError(f"parent folder {out.parent} does not exist")
    if sparsity is None:
        return out, q, None
    sparse_args = {"sparsity": sparsity, "calib_text": read_text(text_path(calib_text, "DN_CALIB_TEXT")),
                   "prior": prior, "seed": seed, "backend": backend,
                   "dense_mlp": q is None and codec is None}  # the MLP written dense
    return out, q, sparse_args | {k: v for k, v in (("router", router), ("select", select)) if v}


def _stored(x: np.ndarray, dtype: str) -> tuple[np.ndarray, str]:
    """float32 -> (bits as stored in dtype, dn's name, and its safetensors name)."""
    return tensors.convert(x, "float32", dtype), next(k for k, v in tensors.FLOATS.items() if v == dtype)


def _quantized(name: str, raw: np.ndarray, dtype: str, q: dict) -> dict:
    """One stored tensor -> itself, or its packed weight, scales and biases (in the weight's dtype, a bf16 one's
    in float16 where that holds them: dn.formats.quant.side_dtype) when it is a Linear or Embedding weight (2-D)
    whose input size the group size divides: what mlx-lm quantizes."""
    path = name.removesuffix(".weight")
    q = q[path] if isinstance(q.get(path), dict) else q
    if path == name or raw.ndim != 2 or raw.shape[1] % q["group_size"]:
        return {name: (raw, dtype)}
    w = tensors.to_float32(raw, dtype)
    packed, scales, biases = quant.quantize(w, q["bits"], q["group_size"])
    side = quant.side_dtype(scales, biases, tensors.FLOATS[dtype])
    return {name: packed, f"{path}.scales": _stored(scales, side), f"{path}.biases": _stored(biases, side)}


def write_quantized(src: Path, dst: Path, q: dict, arch) -> dict:
    """src's weights quantized into dst, file by file, and config.json with "quantization" (and mlx-lm's
    "quantization_config" twin); returns the dict, per-module entries kept only for modules quantized."""
    quant.check_config(q)
    copy_side_files(src, dst)
    done = set()
    tied = {"lm_head.weight"} if arch.tie_word_embeddings else set()  # a stored copy of the embedding: mlx-lm drops it
    for f in weight_files(src):
        out = {}
        for name, (raw, dtype) in tensors.load(f).items():
            out |= {} if name in tied else _quantized(name, raw, dtype, q)
        done |= {k.removesuffix(".scales") for k in out if k.endswith(".scales")}
        tensors.save(out, dst / f.name)
    q = {k: v for k, v in q.items() if not isinstance(v, dict) or k in done}
    # rope explicit: mlx_lm.load reads only rope_theta/rope_scaling (10000 without), not transformers 5's keys
    rope = {"rope_theta": arch.rope_theta} | ({"rope_scaling": arch.rope_scaling} if arch.rope_scaling else {})
    cfg = read_config(src) | rope | {"quantization": q, "quantization_config": q}
    (dst / "config.json").write_text(json.dumps(cfg, indent=4))
    return q


def convert(src: Path, out: Path, codec: str | None, sparse_args: dict | None, quant: dict | None = None) -> None:
    """quant: a "quantization" dict (see quantization()) to write the weights quantized."""
    spec = load_spec(src)
    if spec.quant and codec:
        raise DnError(f"lossless coding of quantized weights is not supported ({src} is quantized)")
    if spec.quant and quant:
        raise DnError(f"{src} is already quantized")
    with atomic_dir(out) as tmp:
        if codec:
            spec.codec = write_lossless(src, tmp)
        elif quant:
            spec.quant = write_quantized(src, tmp, quant, spec.architecture)
            spec.tensors = inventory(tmp)
        else:
            copy_dense(src, tmp)
        if sparse_args is not None:  # calibrates on the dense source, whatever the weights were written as
            spec.sparse = calibrate.calibrate(src, tmp, **sparse_args)
        spec.source = str(src)
        spec.save(tmp)


def write_lossless(src: Path, dst: Path, progress: bool = True) -> dict:
    """Write dst: coded layer weights in codec.safetensors + dn_codec.json, the rest dense in
    model.safetensors, plus config/tokenizer files. Returns the spec's `codec` section."""
    plain, coded, index = {}, {}, {}
    stored = {}
    for f in weight_files(src):
        stored.update(tensors.load(f))
    names = sorted(stored)
    bar = progress_bar(len(names), "compressing", "tensor") if progress else None
    for name in names:
        bits, dt = stored[name]
        if lossless.codable(name, bits.shape, dt):
            enc = lossless.encode(np.asarray(bits), "bfloat16" if dt == "BF16" else "float16")
            coded.update(lossless.to_tensors(name, enc))
            index[name] = enc.header()
        else:
            plain[name] = (np.asarray(bits), dt)
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    tensors.save(plain, dst / "model.safetensors", metadata={"format": "pt"})
    tensors.save(coded, dst / lossless.DATA_FILE, metadata={"format": "dn-codec"})
    (dst / lossless.INDEX_FILE).write_text(json.dumps({"version": lossless.VERSION, "tensors": index}, indent=1))
    for name in COPY:
        if (Path(src) / name).is_file() and name != "model.safetensors":
            (dst / name).write_bytes((Path(src) / name).read_bytes())
    return {"kind": "lossless", "version": lossless.VERSION, "file": lossless.DATA_FILE, "index": lossless.INDEX_FILE,
            "coded_tensors": sorted(index), "coded_bytes": sum(a.nbytes for a in coded.values()),
            "stored_bytes": sum(a.nbytes for a, _ in plain.values()) + sum(a.nbytes for a in coded.values())}
