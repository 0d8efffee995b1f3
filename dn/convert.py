"""`dn convert`: write a model folder dn loads with --model DIR: plain, lossless-compressed or quantized,
and/or sparse.

Everything is written into a temporary folder beside --out and renamed at the end, so an interrupted
or failed run leaves nothing behind. --upload-repo USER/NAME then adds a model card and pushes the folder to
the Hugging Face Hub (dn/hub.py); a failed upload keeps the folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from dn import cli
from dn.core import tensors as safetensors_io
from dn.core.errors import DnError
from dn.formats import quant, sparse

COPY = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json", "chat_template.jinja", "tokenizer.model")
EMBEDDING = "model.embed_tokens"   # module path of the embedding (the lm_head too when tied)
Q_FLAGS = ("q_bits", "q_group_size", "q_embedding_bits", "q_embedding_group_size")


def sparsity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"sparsity must be in (0, 1), got {text!r}")
    return value


def setup_arg_parser():
    p = cli.ArgumentParser(prog="dn convert", description="Write a model folder for dn.")
    p.add_argument("--model", default=None, help="source: folder, .gguf or Hub repo id (default: embedded)")
    p.add_argument("--out", required=True, help="new folder to write (must not exist)")
    p.add_argument("--codec", choices=["lossless"], default=None, help="compress the weights losslessly")
    p.add_argument("-q", "--quantize", action="store_true",
                   help="quantize Linear and Embedding weights, affine group-wise, in mlx-lm's layout "
                        "(mlx_lm.load reads it)")
    p.add_argument("--q-bits", type=int, default=None, help=f"bits per weight for -q, one of {quant.BITS} (default 4)")
    p.add_argument("--q-group-size", type=int, default=None,
                   help=f"weights per scale and bias for -q, one of {quant.GROUP_SIZES} (default 64)")
    p.add_argument("--q-embedding-bits", type=int, default=None, help="bits of the embedding (default --q-bits)")
    p.add_argument("--q-embedding-group-size", type=int, default=None,
                   help="group size of the embedding (default --q-group-size)")
    p.add_argument("--sparsity", type=sparsity, default=None, help="MLP sparsity in (0, 1): fit routers/priors")
    p.add_argument("--calib-text", default=None, help="calibration text (default: $DN_CALIB_TEXT)")
    p.add_argument("--prior", default=None, choices=sparse.PRIORS,
                   help=f"prior for --sparsity (default {sparse.DEFAULT_PRIOR})")
    p.add_argument("--router", default=None, choices=["planes", "int4", "lowrank"],
                   help="router for --sparsity (default: planes, the weights' own split planes, when fitting "
                        f"through torch on a CPU; else {sparse.DEFAULT_ROUTER})")
    p.add_argument("--select", default=None, choices=["threshold", "topk"],
                   help="per-token selection for --sparsity: calibrated threshold, varying count (default), "
                        "or a fixed top-k count")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto", choices=["auto", "mlx", "torch"],
                   help="backend that runs the dense model during calibration (and --card-eval-text)")
    p.add_argument("--upload-repo", default=None, metavar="USER/NAME",
                   help="push the converted folder to this Hugging Face Hub repo, with a model card (README.md)")
    p.add_argument("--private", action="store_true", help="create the --upload-repo repo private")
    p.add_argument("--card-eval-text", default=None, metavar="FILE",
                   help="measure perplexity of the result and of its source on this text for the model card "
                        "(otherwise the card says quality was not measured)")
    p.add_argument("--card-eval-tokens", type=cli.positive_int, default=None,
                   help="tokens of --card-eval-text to evaluate (default 4096)")
    return p


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


def _stored(x: np.ndarray, dtype: str) -> tuple[np.ndarray, str]:
    """float32 -> (bits as stored in safetensors dtype `dtype`, dtype)."""
    return (safetensors_io.f32_to_bf16(x) if dtype == "BF16" else x.astype(safetensors_io.DTYPES[dtype])), dtype


def _quantized(name: str, raw: np.ndarray, dtype: str, q: dict) -> dict:
    """One stored tensor -> itself, or its packed weight, scales and biases (in the weight's dtype) when it
    is a Linear or Embedding weight (2-D) whose input size the group size divides: what mlx-lm quantizes."""
    path = name.removesuffix(".weight")
    q = q[path] if isinstance(q.get(path), dict) else q
    if path == name or raw.ndim != 2 or raw.shape[1] % q["group_size"]:
        return {name: (raw, dtype)}
    w = safetensors_io.bf16_to_f32(raw) if dtype == "BF16" else raw
    packed, scales, biases = quant.quantize(w, q["bits"], q["group_size"])
    return {name: packed, f"{path}.scales": _stored(scales, dtype), f"{path}.biases": _stored(biases, dtype)}


def write_quantized(src: Path, dst: Path, q: dict, arch) -> dict:
    """src's weights quantized into dst, file by file, and config.json with "quantization" (and mlx-lm's
    "quantization_config" twin); returns the dict, per-module entries kept only for modules quantized."""
    from dn.model.spec import read_config, weight_files

    quant.check_config(q)
    copy_side_files(src, dst)
    done = set()
    tied = {"lm_head.weight"} if arch.tie_word_embeddings else set()  # a stored copy of the embedding: mlx-lm drops it
    for f in weight_files(src):
        out = {}
        for name, (raw, dtype) in safetensors_io.load(f).items():
            out |= {} if name in tied else _quantized(name, raw, dtype, q)
        done |= {k.removesuffix(".scales") for k in out if k.endswith(".scales")}
        safetensors_io.save(out, dst / f.name)
    q = {k: v for k, v in q.items() if not isinstance(v, dict) or k in done}
    # rope explicit: mlx_lm.load reads only rope_theta/rope_scaling (10000 without), not transformers 5's keys
    rope = {"rope_theta": arch.rope_theta} | ({"rope_scaling": arch.rope_scaling} if arch.rope_scaling else {})
    cfg = read_config(src) | rope | {"quantization": q, "quantization_config": q}
    (dst / "config.json").write_text(json.dumps(cfg, indent=4))
    return q


def convert(src: Path, out: Path, codec: str | None, sparse_args: dict | None, quant: dict | None = None) -> None:
    """quant: a "quantization" dict (see quantization()) to write the weights quantized."""
    from dn.model.sources import as_made_by_mkdir
    from dn.model.spec import inventory, load_spec

    spec = load_spec(src)
    if spec.quant and codec:
        raise DnError(f"lossless coding of quantized weights is not supported ({src} is quantized)")
    if spec.quant and quant:
        raise DnError(f"{src} is already quantized")
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        if codec:
            from dn.formats import lossless

            spec.codec = lossless.compress_model(src, tmp)
        elif quant:
            spec.quant = write_quantized(src, tmp, quant, spec.architecture)
            spec.tensors = inventory(tmp)
        else:
            copy_dense(src, tmp)
        if sparse_args is not None:  # calibrates on the dense source, whatever the weights were written as
            from dn.runtime import calibrate

            spec.sparse = calibrate.calibrate(src, tmp, **sparse_args)
        spec.source = str(src)
        spec.save(tmp)
        as_made_by_mkdir(tmp)  # mkdtemp makes it 0700
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def quantize_args(args) -> dict | None:
    """The -q flags as a "quantization" dict (None without -q), checked before any work."""
    if not args.quantize:
        if any(getattr(args, f) is not None for f in Q_FLAGS):
            raise DnError(f"{', '.join('--' + f.replace('_', '-') for f in Q_FLAGS)} need -q")
        return None
    if args.codec:
        raise DnError("lossless coding of quantized weights is not supported (choose -q or --codec lossless)")
    return quantization(*(getattr(args, f) for f in Q_FLAGS))


def _main(argv) -> int:
    from dn.core.text import read_text, text_path
    from dn.model.sources import resolve_model

    args = setup_arg_parser().parse_args(argv)
    quantize = quantize_args(args)
    out = Path(args.out).expanduser()
    if out.exists():
        raise DnError(f"{out} already exists (dn convert writes a new folder)")
    if not out.parent.is_dir():
        raise DnError(f"parent folder {out.parent} does not exist")
    sparse_args = None
    if args.sparsity is not None:
        text = read_text(text_path(args.calib_text, "DN_CALIB_TEXT"))  # fail before any work
        sparse_args = {"sparsity": args.sparsity, "calib_text": text, "prior": args.prior,
                       "seed": args.seed, "backend": args.backend,
                       "dense_mlp": quantize is None and args.codec is None}  # the MLP written dense
        sparse_args |= {k: v for k, v in (("router", args.router), ("select", args.select)) if v}
    elif args.prior or args.calib_text or args.router or args.select:
        raise DnError("--prior, --router, --select and --calib-text need --sparsity")
    card_text = upload_args(args)
    src = resolve_model(args.model)
    convert(src, out, args.codec, sparse_args, quantize)
    print(f"wrote {out}")
    if args.upload_repo:
        from dn import hub

        quality = None
        if card_text is not None:
            try:
                quality = hub.measure(out, src, card_text, Path(args.card_eval_text).name, args.backend,
                                      args.card_eval_tokens or hub.CARD_EVAL_TOKENS)
            except DnError as e:
                raise DnError(f"{e}; the converted folder is kept at {out}") from None
        url = hub.publish(out, args.upload_repo, private=args.private, base=hub.base_model(args.model),
                          quality=quality)
        print(f"uploaded {out} to {url}")
    return 0


def upload_args(args) -> str | None:
    """Check the upload flags before any work; the --card-eval-text text, read now (None without it)."""
    from dn.core.text import read_text

    if not args.upload_repo:
        if args.private or args.card_eval_text or args.card_eval_tokens:
            raise DnError("--private, --card-eval-text and --card-eval-tokens need --upload-repo")
        return None
    from dn import hub

    hub.preflight(args.upload_repo)
    if args.card_eval_tokens and not args.card_eval_text:
        raise DnError("--card-eval-tokens needs --card-eval-text")
    return read_text(Path(args.card_eval_text).expanduser()) if args.card_eval_text else None


def main(argv=None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
