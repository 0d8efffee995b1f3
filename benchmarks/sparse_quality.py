"""Sparse MLP quality: eval perplexity and greedy agreement vs dense, drop vs prior, per sparsity.

Fits on the calibration text only (in memory, the same code dn convert runs), measures on the eval text.
    python benchmarks/sparse_quality.py --calib-text ../shared/data/calib.txt --eval-text ../shared/data/eval.txt \
        --backend torch --json docs/results/sparse-quality-torch.json

JSON: dn.runtime.timing.report, a record per row (benchmarks/sparse_table.py makes the markdown).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np

from dn.core.text import read_text
from dn.evaluate import perplexity
from dn.formats import sparse
from dn.model import store
from dn.runtime import calibrate, loader, timing

PROMPTS = ["The history of the city begins", "In a statement released on Monday, the company said",
           "Scientists have discovered", "def fibonacci(n):", "The best way to learn a language is",
           "Once upon a time", "The main causes of the financial crisis were", "Water boils at"]


def greedy(be, model, tok, prompt: str, n: int) -> list[int]:
    ids = tok.encode(prompt)
    cache = be.make_cache(model)
    logits = be.logits(model, np.asarray([ids]), cache, last_only=True)
    out = []
    for _ in range(n):
        t = int(np.argmax(logits[0, -1]))
        out.append(t)
        logits = be.logits(model, np.asarray([[t]]), cache, last_only=True)
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of positions before the first divergence, averaged over prompts (teacher-free)."""
    fr = []
    for x, y in zip(a, b):
        k = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), len(x))
        fr.append(k / len(x))
    return float(np.mean(fr))


def token_agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of generated positions holding the same token as dense (each run free-running)."""
    return float(np.mean([np.mean(np.asarray(x) == np.asarray(y)) for x, y in zip(a, b)]))


def equal_bytes_sparsity(s: float, d: int, n: int, prior: str) -> float:
    """Sparsity at which plain dropping keeps as many more (bf16) neurons per layer as the prior's bytes would
    buy: the equal-resident-bytes ablation the prior must beat."""
    b = store.sparse_side({"hidden": d, "intermediate": n, "router": "int4", "prior": prior}, 2)
    return s - b["prior"] / b["neuron"] / n


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--calib-text", required=True)
    p.add_argument("--eval-text", required=True)
    p.add_argument("--model", default=None, help="model folder or name (default: dn's default model)")
    p.add_argument("--backend", default="torch")
    p.add_argument("--sparsity", default="0.3,0.5,0.7")
    p.add_argument("--priors", default=",".join(sparse.PRIORS))
    p.add_argument("--rank", type=int, default=sparse.DEFAULT_RANK)
    p.add_argument("--router", default=sparse.DEFAULT_ROUTER, choices=sparse.ROUTERS)
    p.add_argument("--select", default=sparse.DEFAULT_SELECT, choices=sparse.SELECTS)
    p.add_argument("--calib-tokens", type=int, default=calibrate.MAX_TOKENS)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--prompts", type=int, default=len(PROMPTS))
    p.add_argument("--oracle", default="", help="sparsities (comma-separated) that also get a row routed by the "
                                                "true activations (same rule), with plain dropping")
    p.add_argument("--equal-bytes", default="median,sketch",
                   help="priors (comma-separated) ablated by plain dropping at the keep their bytes would buy")
    p.add_argument("--no-equal-bytes", dest="equal_bytes", action="store_const", const="", help="no ablation rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fit-backend", default=None,
                   help="backend that runs the dense model for fitting (default: --backend); the spec is the "
                        "same either way, so MLX can be measured on a spec fitted through torch")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    run = loader.load(args.model, args.backend, "float32")
    be, model, tok = run.backend, run.model, run.tokenizer
    act = run.spec.architecture.mlp_act
    ev = tok.encode(read_text(args.eval_text))[:args.eval_tokens]
    prompts = PROMPTS[:args.prompts]
    t0 = time.time()
    dense_nll, count = perplexity(be, model, ev, args.ctx)
    dense_gen = [greedy(be, model, tok, q, args.gen_tokens) for q in prompts]
    rows = [{"sparsity": 0.0, "prior": "dense", "ppl": math.exp(dense_nll), "delta": 0.0, "agree": 1.0,
             "agree_tokens": 1.0}]
    print(f"dense ppl {rows[0]['ppl']:.4f} over {count} tokens ({time.time() - t0:.0f}s)", file=sys.stderr)
    wins = calibrate.calibration_windows(tok.encode(read_text(args.calib_text)), args.seed,
                                         max_tokens=args.calib_tokens)
    fit = run if args.fit_backend in (None, be.NAME) else loader.load(args.model, args.fit_backend, "float32")
    fmod = fit.backend
    inputs = [np.concatenate(p) for p in zip(*[fmod.collect_mlp_inputs(fit.model, [w[None]]) for w in wins])]
    weights = [fmod.mlp_weights(fit.model, i) for i in range(len(inputs))]
    evx = fmod.collect_mlp_inputs(fit.model, [np.asarray(ev[:args.ctx])[None]])
    if fit is not run:
        fit.backend.free(fit.model)
        del fit
    recalls = {}
    n, d = weights[0][0].shape
    plan = [(s, prior, s) for s in [float(v) for v in args.sparsity.split(",")] for prior in args.priors.split(",")]
    plan += [(s, f"none@bytes-of-{prior}", equal_bytes_sparsity(s, d, n, prior)) for s, prior, _ in plan
             if prior in args.equal_bytes.split(",")]
    oracle_at = [float(v) for v in args.oracle.split(",") if v]
    for s, prior, fit_s in plan:
        kind = prior.split("@")[0]   # "none@bytes-of-sketch" fits plain dropping
        layers = calibrate.fit_model(inputs, lambda i: weights[i], fit_s, kind, args.rank, False, args.router,
                                     args.select, act)
        masks = [sparse.route_mask(x, lay) for x, lay in zip(evx, layers)]
        kept = float(np.mean([m.mean() for m in masks]))  # threshold selection: count varies per token
        if s not in recalls:
            recalls[s] = [sparse.recall(m, sparse.oracle_mask(x, *w, m.sum(1), act))
                          for m, x, w in zip(masks, evx, weights)]
        spec = sparse.SparseSpec(fit_s, d, n, args.router, args.rank, kind, args.select, act,
                                 keep=[lay.keep for lay in layers], layers=layers)
        for oracle in ([False, True] if s in oracle_at and prior == "none" else [False]):
            be.install_sparse(model, spec)
            for layer in model.model.layers:
                layer.mlp.oracle = oracle
            nll, _ = perplexity(be, model, ev, args.ctx)
            gen = [greedy(be, model, tok, q, args.gen_tokens) for q in prompts]
            row = {"sparsity": s, "prior": prior, "router": "oracle" if oracle else args.router,
                   "fit_sparsity": fit_s, "kept_on_eval": kept,
                   "ppl": math.exp(nll), "delta": math.exp(nll - dense_nll) - 1,
                   "agree": agreement(gen, dense_gen), "agree_tokens": token_agreement(gen, dense_gen)}
            rows.append(row)
            print(json.dumps(row), f"({time.time() - t0:.0f}s)", file=sys.stderr)
    result = timing.report(rows, sys.argv, backend=be.NAME, fit_backend=args.fit_backend or be.NAME,
                           device=be.device_name(), eval_tokens=count, calib_tokens=int(wins.size),
                           router=args.router, select=args.select, rank=args.rank, gen_tokens=args.gen_tokens,
                           prompts=len(prompts), recall_per_layer={str(k): v for k, v in recalls.items()},
                           bytes_per_layer_bf16=store.sparse_side(spec.section(), 2))
    print(json.dumps(result, indent=1))
    if args.json:
        timing.write(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
