"""The Hugging Face Hub round trip: `dn convert --upload-repo USER/NAME` writes a model card (README.md) into the
converted folder and pushes the folder with huggingface_hub; `--model USER/NAME` pulls it back (dn/model/sources.py).

The card says what dn did (format, sparse section), the footprint dn accounts (dn.model.store.resident_bytes) and the
quality only when it was measured (`--card-eval-text`): never a number that was not.
"""

from __future__ import annotations

import gc
import hashlib
import math
import os
from pathlib import Path

from dn import footprint
from dn.core import __version__
from dn.core.errors import DnError
from dn.evaluate import perplexity
from dn.model import store
from dn.model.sources import REPO_ID
from dn.model.spec import load_spec
from dn.runtime import loader

CARD = "README.md"
DEFAULT_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the default model's GGUF: its organization and name
DEFAULT_LICENSE = "apache-2.0"                          # the GGUF's general.license
CARD_EVAL_TOKENS = 4096
CARD_EVAL_CTX = 512
CARD_EVAL_DTYPE = "float32"
PROMPT = "What is the capital of France?"


# ---- before any work --------------------------------------------------------------------------------------

def _offline() -> bool:
    from huggingface_hub import constants  # late: only an upload needs the Hub client

    env = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    return env or bool(constants.HF_HUB_OFFLINE)


def preflight(repo_id: str) -> None:
    """Refuse an upload that cannot happen, before dn converts anything: a malformed repo id, HF_HUB_OFFLINE,
    no token."""
    from huggingface_hub import get_token  # late: only an upload needs the Hub client

    if not REPO_ID.match(repo_id):
        raise DnError(f"--upload-repo {repo_id!r} is not a Hub repo id (USER/NAME)")
    if _offline():
        raise DnError("--upload-repo needs the network, and HF_HUB_OFFLINE=1 forbids it")
    try:
        token = get_token()
    except Exception as e:  # an OIDC token exchange (HF_OIDC_RESOURCE) that failed
        raise DnError(f"no Hugging Face token: {_short(e)}") from None
    if not token:
        raise DnError("--upload-repo needs a Hugging Face token (run `hf auth login` or set HF_TOKEN)")


def base_model(model: str | None) -> str | None:
    """The Hub id of what was converted, when dn knows it: the default model's, or --model given as a repo id."""
    if model is None:
        return DEFAULT_BASE
    text = str(model)
    if REPO_ID.match(text) and not text.startswith((".", "/", "~")) and not Path(text).expanduser().exists():
        return text
    return None


# ---- quality, only when asked -----------------------------------------------------------------------------

def measure(folder: Path, source: Path, text: str, text_name: str, backend: str = "auto",
            max_tokens: int = CARD_EVAL_TOKENS) -> dict:
    """Perplexity of the converted folder and of its source on the same first max_tokens tokens of text (float32,
    non-overlapping windows of CARD_EVAL_CTX), one model loaded at a time."""
    out = {"text": text_name, "text_sha256": hashlib.sha256(text.encode()).hexdigest(), "ctx": CARD_EVAL_CTX,
           "dtype": CARD_EVAL_DTYPE}
    for key, path in (("ppl", folder), ("source_ppl", source)):
        run = loader.load(str(path), backend, CARD_EVAL_DTYPE)
        nll, count = perplexity(run.backend, run.model, run.tokenizer.encode(text)[:max_tokens], CARD_EVAL_CTX,
                                bos=run.tokenizer.bos_id)
        out |= {key: math.exp(nll), "tokens": count, "backend": run.backend.NAME,
                "device": run.backend.device_name()}
        del run
        gc.collect()
    return out


# ---- the card ---------------------------------------------------------------------------------------------

def plain_quantized(spec) -> bool:
    """A -q folder with nothing dn-only in it: mlx-lm runs it as dn does."""
    return bool(spec.quant) and not spec.codec and not spec.sparse


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def _q_text(p: dict) -> str:
    return f"{p['bits']} bits, groups of {p['group_size']}"


def _format_lines(spec) -> list[str]:
    entries = store.entries(spec)
    quantized = sum(e.format == "affine" for e in entries)
    if spec.quant:
        q = spec.quant
        own = "".join(f"; `{k}` {_q_text(v)}" for k, v in q.items() if isinstance(v, dict))
        lines = [f"- Weights: affine group-wise quantization in mlx-lm's layout (`dn convert -q`), {_q_text(q)}{own}, "
                 f"each group on its min/max grid: {quantized} of {len(entries)} weights (norms, and any weight "
                 "whose input size the group size does not divide, stay dense, as in mlx-lm)."]
    elif spec.codec:
        coded = set(spec.codec["coded_tensors"])
        numel = sum(e.numel for e in entries if e.name in coded)
        bits = 8 * spec.codec["coded_bytes"] / numel if numel else 0.0
        lines = [f"- Weights: dn's lossless codec (`dn convert --codec lossless`): {len(coded)} tensors with their "
                 f"bf16 exponents entropy-coded, {bits:.2f} bits per weight, decoded bit-exactly on the fly; "
                 "only dn reads them."]
    else:
        dtypes = sorted({t.dtype for t in spec.tensors})
        lines = [f"- Weights: dense, as in the source ({', '.join(dtypes)})."]
    s = spec.sparse
    if s:
        cal = s.get("calibration", {})
        fitted = f", fitted on {cal['tokens']} calibration tokens ({cal.get('backend')})" if "tokens" in cal else ""
        lines.append(f"- Sparse MLP (`--sparsity {s['sparsity']:g}`): per token, about {s['sparsity']:.0%} of each "
                     f"layer's MLP neurons are skipped; router {s['router']}, selection {s.get('select', 'topk')}, "
                     f"prior {s.get('prior')}{fitted}. Only dn runs it (`dn_sparse.safetensors`).")
    else:
        lines.append("- No sparse MLP: every token runs the whole model.")
    return lines


def _footprint_lines(spec, folder: Path, repo_id: str) -> list[str]:
    dense_bf16 = footprint.accounted(spec, "bfloat16", 1)["dense_weight_bytes"]
    rows = []
    for dtype in ("bfloat16", "float32"):
        r = footprint.accounted(spec, dtype, 1)["resident_weight_bytes"]
        rows.append(f"| {dtype} | {_mib(r)} | {r / dense_bf16:.1%} |")
    on_disk = sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and f.name != CARD)
    return ["Accounted by dn from the tensor inventory (`dn.model.store.resident_bytes`): the weights a backend holds "
            "resident at each compute dtype, sparse side data included, KV cache not. Dense bf16 weights of this "
            f"model: {_mib(dense_bf16)}.", "",
            "| compute dtype | resident weights | of dense bf16 |", "|---|---|---|", *rows, "",
            f"Files: {_mib(on_disk)}. `dn footprint --model {repo_id}` prints the same accounting next to what the "
            "platform measures a load to hold."]


def _quality_lines(quality: dict | None, repo_id: str) -> list[str]:
    if not quality:
        return ["Not measured: `dn convert` measured no perplexity for this folder. "
                f"`dn eval --model {repo_id} --text FILE` measures it."]
    delta = quality["ppl"] / quality["source_ppl"] - 1
    return [f"Perplexity on `{quality['text']}` (sha256 {quality['text_sha256'][:12]}), the first "
            f"{quality['tokens']} predicted tokens in non-overlapping windows of {quality['ctx']}, "
            f"{quality['dtype']}, {quality['backend']} ({quality['device']}), measured by `dn convert "
            "--card-eval-text`:", "",
            "| model | perplexity |", "|---|---|",
            f"| this folder | {quality['ppl']:.4f} ({delta:+.2%}) |",
            f"| its source | {quality['source_ppl']:.4f} |"]


def _run_lines(repo_id: str, mlx: bool) -> list[str]:
    lines = ["With dn (MLX or PyTorch backend; dreamnova installed):", "", "```bash",
             f'dn generate --model {repo_id} --prompt "{PROMPT}"',
             f"dn generate --model {repo_id} --backend torch   # or --backend mlx", "```"]
    if mlx:
        lines += ["", "A plain `-q` folder is mlx-lm's own layout, so mlx-lm runs it too:", "", "```bash",
                  "pip install mlx-lm", f'mlx_lm.generate --model {repo_id} --prompt "{PROMPT}"', "```"]
    return lines


def _yaml_list(key: str, values: list[str]) -> list[str]:
    return [f"{key}:", *(f"- {v}" for v in values)]


def model_card(folder: Path, repo_id: str, base: str | None = None, quality: dict | None = None) -> str:
    """The README.md of a converted folder: YAML front matter, then what dn did, footprint, quality, how to run."""
    spec = load_spec(Path(folder))
    mlx = plain_quantized(spec)
    tags = ["dreamnova"] + [t for t, on in (("mlx", mlx), ("quantized", spec.quant), ("sparse", spec.sparse),
                                            ("lossless", spec.codec)) if on]
    meta = [f"library_name: {'mlx' if mlx else 'dreamnova'}", *_yaml_list("tags", tags),
            "pipeline_tag: text-generation"]
    if base:
        meta.append(f"base_model: {base}")
        if spec.quant and not spec.sparse:
            meta.append("base_model_relation: quantized")
        if base == DEFAULT_BASE:
            meta.append(f"license: {DEFAULT_LICENSE}")
    a = spec.architecture
    shape = f"{a.num_hidden_layers} layers, hidden size {a.hidden_size}"
    what = f"[{base}](https://huggingface.co/{base}) ({a.model_type}, {shape})" if base else \
        f"A {a.model_type} model ({shape})"
    body = [f"# {repo_id.split('/')[-1]}", "",
            f"{what} converted by "
            f"`dn convert` (dreamnova {__version__}), which runs language "
            "models in less memory on MLX and PyTorch.", "",
            "## What dn did", "", *_format_lines(spec), "",
            "## Footprint", "", *_footprint_lines(spec, Path(folder), repo_id), "",
            "## Quality", "", *_quality_lines(quality, repo_id), "",
            "## Run it", "", *_run_lines(repo_id, mlx), ""]
    return "\n".join(["---", *meta, "---", "", *body])


def write_card(folder: Path, repo_id: str, base: str | None = None, quality: dict | None = None) -> Path:
    path = Path(folder) / CARD
    try:
        path.write_text(model_card(folder, repo_id, base, quality))
    except OSError as e:
        raise DnError(f"cannot write {path}: {e.strerror}") from None
    return path


# ---- the upload -------------------------------------------------------------------------------------------

def _short(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{e.__class__.__name__}: {first[:160]}" if first else e.__class__.__name__


def upload(folder: Path, repo_id: str, private: bool = False) -> str:
    """create_repo (exist_ok) then upload_folder; returns the repo's URL. Any failure (no token, no network,
    refused) is one DnError line that says where the converted folder is kept and how to retry."""
    from huggingface_hub import HfApi  # late: only an upload needs the Hub client

    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True, private=True if private else None)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="dn convert")
    except Exception as e:  # the Hub and HTTP client raise many types; each is one line here
        raise DnError(f"upload to {repo_id} failed ({_short(e)}); the converted folder is kept at {folder} "
                      f"(retry: hf upload {repo_id} {folder})") from None
    return f"https://huggingface.co/{repo_id}"


def publish(folder: Path, repo_id: str, *, private: bool = False, base: str | None = None,
            quality: dict | None = None) -> str:
    """Card, then upload; returns the repo's URL."""
    try:
        write_card(folder, repo_id, base, quality)
    except DnError as e:
        raise DnError(f"{e}; the converted folder is kept at {folder}") from None
    return upload(folder, repo_id, private)
