"""bf16 on MLX (issue 20, item 4): why dn's q4g32e8 folder of the default model degenerated at bf16 on MLX, measured.

    python scripts/bf16_mlx.py        # writes docs/results/bf16-mlx.json (~30 min on 2 CPU cores: mlx's bf16
                                      # kernel on a CPU is the slow part)

Folders, from the dense default model: dn's q4g32e8 as written now (float16 scales and biases), as written before
(bfloat16 ones), and mlx-lm's own `convert -q --q-group-size 32`. Measured: each candidate cause (grid, the dtype of
scales and biases, bf16 arithmetic of the dequantization, the matmul's sums), the first 256 tokens' perplexity of
tests/data/eval-small.txt at float32 and bf16 (dn on MLX and torch, and mlx-lm as it loads a folder), the greedy
answer to "What is the capital of France?" and its first token's top two logits."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dn  # noqa: E402
from dn.core import tensors  # noqa: E402
from dn.evaluate import perplexity  # noqa: E402
from dn.formats import quant  # noqa: E402
from dn.model.sources import resolve_model  # noqa: E402
from dn.runtime import writer  # noqa: E402
from dn.runtime.generation import prompt_ids  # noqa: E402
from dn_mlx.quant import affine_matmul  # noqa: E402

OUT = ROOT / "docs/results/bf16-mlx.json"
TEXT = ROOT / "tests/data/eval-small.txt"
PROMPT = "What is the capital of France?"
TOKENS, ANSWER = 256, 8
KERNEL_LAYERS = ["model.layers.3.self_attn.q_proj", "model.layers.3.mlp.down_proj", "model.embed_tokens"]


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _round(a, dtype):
    return tensors.convert(tensors.convert(np.asarray(a, np.float32), "float32", dtype), dtype, "float32")


def weight_errors(src: dict) -> dict:
    """Relative (Frobenius) error of the dequantized weights against the dense ones, over the 4-bit layers and the
    8-bit embedding: dn's min/max grid with scales and biases held in float32, float16 or bfloat16; the same
    bfloat16 ones dequantized in bf16 arithmetic (what mlx's bf16 kernels compute, bf16(bf16(s * q) + b)); and
    mx.quantize's grid (mlx-lm's conversion, scales and biases bfloat16)."""
    sums = {}
    for name, (raw, dt) in src.items():
        if raw.ndim != 2:
            continue
        w, bits = tensors.to_float32(raw, dt), 8 if name.startswith("model.embed_tokens") else 4
        packed, s, b = quant.quantize(w, bits, 32)
        got = {d: quant.dequantize(packed, _round(s, d), _round(b, d), bits, 32)
               for d in ("float32", "float16", "bfloat16")}
        q = quant.unpack(packed, bits, w.shape[1]).astype(np.float32).reshape(len(w), -1, 32)
        prod = _round(_round(s, "bfloat16")[..., None] * q, "bfloat16")
        got["bfloat16, bf16 arithmetic"] = _round(prod + _round(b, "bfloat16")[..., None], "bfloat16").reshape(w.shape)
        mp, ms, mb = mx.quantize(mx.array(w).astype(mx.bfloat16), group_size=32, bits=bits)
        got["mx.quantize grid, bfloat16"] = np.array(mx.dequantize(mp, ms.astype(mx.float32), mb.astype(mx.float32),
                                                                   group_size=32, bits=bits))
        part = sums.setdefault(f"{bits}-bit", {})
        for k, v in got.items():
            e = part.setdefault(k, [0.0, 0.0])
            e[0], e[1] = e[0] + float(((v - w) ** 2).sum()), e[1] + float((w ** 2).sum())
    return {part: {k: round((e / n) ** 0.5, 5) for k, (e, n) in v.items()} for part, v in sums.items()}


def kernel_errors(folder: Path) -> dict:
    """Relative error of x @ W.T at bf16 (x: 16 rows of N(0, 1), rounded to bf16) against float64 over the same
    stored weights: mlx's quantized_matmul as it is (on a CPU it sums in bf16) and dn_mlx.quant.affine_matmul
    (float32 sums), with each one's time."""
    stored, rng, out = mx.load(str(folder / "model.safetensors")), np.random.default_rng(0), {}
    for path in KERNEL_LAYERS:
        w, s, b = (stored[f"{path}.{k}"] for k in ("weight", "scales", "biases"))
        bits = w.shape[1] // s.shape[1]  # packed words per group of 32 weights
        s16, b16 = s.astype(mx.bfloat16), b.astype(mx.bfloat16)
        dense = quant.dequantize(np.array(w), np.array(s16.astype(mx.float32)), np.array(b16.astype(mx.float32)),
                                 bits, 32)
        x = mx.array(rng.standard_normal((16, dense.shape[1])).astype(np.float32)).astype(mx.bfloat16)
        want = np.array(x.astype(mx.float32), np.float64) @ dense.astype(np.float64).T
        row = {"shape": list(dense.shape), "bits": bits}
        for name in ("mx.quantized_matmul", "dn_mlx.quant.affine_matmul"):
            t = time.perf_counter()
            y = (affine_matmul(x, w, s16, b16, bits, 32) if name.startswith("dn") else
                 mx.quantized_matmul(x, w, s16, b16, transpose=True, group_size=32, bits=bits))
            mx.eval(y)
            row[name] = {"rel_err": round(_rel(np.array(y.astype(mx.float32)), want), 5),
                         "ms": round(1e3 * (time.perf_counter() - t), 1)}
        out[path] = row
    return out


def _mlx_lm_nll(model, tokens) -> float:
    logits = model(mx.array(tokens)[None]).astype(mx.float32)[0, :-1]
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return float(-mx.take_along_axis(lp, mx.array(tokens[1:])[:, None], axis=-1).mean())


def _top2(logits, tokenizer) -> list:
    top = np.argsort(-logits)[:2]
    return [[tokenizer.decode([int(t)]), round(float(logits[t]), 4)] for t in top]


def runs(folders: dict, dense: Path, tokens: list, log) -> dict:
    """Per folder: perplexity, first-token top two and greedy answer for each way of running it."""
    import mlx_lm

    out = {}
    for tag, folder in folders.items():
        rows = out.setdefault(tag, {})
        for backend, dtype in (("mlx", "float32"), ("mlx", "bfloat16"), ("torch", "float32"), ("torch", "bfloat16")):
            loaded = dn.load(str(folder), backend=backend, dtype=dtype)
            ids = prompt_ids(loaded.tokenizer, PROMPT, False, None)
            t = time.perf_counter()
            nll, n = perplexity(loaded.backend, loaded.model, tokens, TOKENS)
            row = {"ppl": round(float(np.exp(nll)), 4), "tokens": n, "s": round(time.perf_counter() - t, 1),
                   "first_token_top2": _top2(loaded.backend.logits(loaded.model, np.array([ids]))[0, -1],
                                             loaded.tokenizer),
                   "answer": dn.generate(loaded, PROMPT, max_tokens=ANSWER)}
            rows[f"dn {backend} {dtype}"] = row
            log(tag, backend, dtype, row)
        if tag == "dense":
            continue
        model, tok = mlx_lm.load(str(folder))
        held = str(next(v.dtype for k, v in _leaves(model) if k.endswith("scales")))
        act = str(model.model.layers[0].input_layernorm(model.model.embed_tokens(mx.array([ids]))).dtype)
        for how in ("as loaded", "float32"):
            if how == "float32":
                model.set_dtype(mx.float32)
            t = time.perf_counter()
            nll = _mlx_lm_nll(model, tokens)
            row = {"ppl": round(float(np.exp(nll)), 4), "s": round(time.perf_counter() - t, 1),
                   "first_token_top2": _top2(np.array(model(mx.array([ids]))[0, -1].astype(mx.float32)), tok),
                   "answer": mlx_lm.generate(model, tok, ids, max_tokens=ANSWER)}
            if how == "as loaded":
                row |= {"scales_dtype": held, "activation_dtype": act}
            rows[f"mlx_lm {how}"] = row
            log(tag, "mlx_lm", how, row)
    return out


def _leaves(model):
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())


def main() -> int:
    log = lambda *a: print(*a, file=sys.stderr, flush=True)
    dense = resolve_model(None, progress=False, dense=True)
    src = tensors.load(next(dense.glob("*.safetensors")))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folders = {"dense": dense, "dn q4g32e8 (float16 scales)": tmp / "new", "dn q4g32e8 (bfloat16 scales, before)":
                   tmp / "old", "mlx-lm q4g32": tmp / "mlx"}
        q = writer.quantization(4, 32, 8)
        writer.convert(dense, folders["dn q4g32e8 (float16 scales)"], None, None, q)
        side, quant.side_dtype = quant.side_dtype, lambda s, b, dtype: dtype  # the writer before: the weight's dtype
        writer.convert(dense, folders["dn q4g32e8 (bfloat16 scales, before)"], None, None, q)
        quant.side_dtype = side
        from mlx_lm.convert import convert

        convert(str(dense), str(folders["mlx-lm q4g32"]), quantize=True, q_bits=4, q_group_size=32)
        log("weight errors")
        weights = weight_errors(src)
        log(weights)
        kernels = kernel_errors(folders["dn q4g32e8 (bfloat16 scales, before)"])
        log(kernels)
        tok = dn.load(str(dense), backend="mlx", dtype="float32").tokenizer
        tokens = tok.encode(TEXT.read_text())[:TOKENS]
        results = runs(folders, dense, tokens, log)
    OUT.write_text(json.dumps({
        "about": "scripts/bf16_mlx.py: dn's q4g32e8 folder of the default model (SmolLM2-135M Q4_1, dense widening) "
                 "at bf16 on MLX; ppl over the first 256 tokens of tests/data/eval-small.txt, one window",
        "machine": "2-core x86 CPU, mlx[cpu] " + mx.__version__ + ", shared with other jobs (times are rough)",
        "weight_rel_err": weights, "kernel_bf16": kernels, "runs": results}, indent=1) + "\n")
    log(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
