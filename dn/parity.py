"""`dn parity` (also `python -m parity.run`, `nox -s parity`): logits, hidden states and greedy tokens of two
backends, compared.

Relative error at a position = max|dlogit| / max|logit| over the vocabulary, first backend as reference.
Thresholds come from dn.core.tolerances.PARITY; a breach exits 3 (BREACH), apart from a crash (1) and a usage
error (2), so CI can report bf16 without gating on it and still fail on a traceback.

A sparse model (dn convert --sparsity) routes each token by comparing router scores to thresholds, a
discontinuous decision: a near-tie that float32 rounding flips swaps a neuron and the difference compounds
over the layers. So parity splits the question in two. (1) Router decisions: the second backend routes the
same inputs on its own, and its decisions must agree with the first's (ROUTE_AGREEMENT). (2) Arithmetic:
the second backend executes the first's decisions (tape_routes replay), and logits, hidden states and
greedy tokens must meet the dense thresholds.
"""

from __future__ import annotations

import gc
import sys

import numpy as np

from dn import cli
from dn.core.errors import DnError
from dn.core.tolerances import PARITY, ROUTE_AGREEMENT
from dn.footprint import accounted, write_json
from dn.runtime import loader, memory, sparse_mlp
from dn.runtime.generation import generate_tokens

BREACH = 3  # exit code of a run that breached a threshold
MEMORY = ("measured_resident_bytes", "measured_kind", "load_peak_bytes", "load_peak_kind")  # of dn.runtime.memory

PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a screw press into one system that",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n"
    "    return fibonacci(n - 1) + fibonacci(n - 2)\n\nprint(",
    "Water boils at 100 degrees Celsius at sea level, but at higher altitudes the air pressure is lower, "
    "so the boiling point",
    "Question: A train leaves at 3 pm and travels 120 km at 60 km per hour. When does it arrive?\nAnswer:",
]


def setup_arg_parser():
    p = cli.ArgumentParser(prog="dn parity", description="Compare two backends on the same model.",
                           epilog=f"exit codes: 0 passed, {BREACH} a threshold breached (the comparison ran), "
                                  "1 a crash, 2 a usage error")
    p.add_argument("--model", default=None, help="model folder, .gguf or Hub repo id (default: embedded)")
    p.add_argument("--backends", default="mlx,torch", help="two backends, the first is the reference")
    p.add_argument("--dtype", default="float32", choices=sorted(PARITY))
    p.add_argument("--tokens", type=cli.positive_int, default=64, help="greedy tokens to compare")
    p.add_argument("--json", default=None)
    cli.add_threads_arg(p)
    return p


def rel_err(ref: np.ndarray, other: np.ndarray) -> np.ndarray:
    """[..., V] -> [...]: max|d| / max|ref| over the last axis."""
    return np.abs(ref - other).max(-1) / np.maximum(np.abs(ref).max(-1), 1e-30)


def steps(tokens: int) -> int:
    """What observe() reports to its progress bar: one step per prompt, one for the hidden states, one per
    greedy token."""
    return len(PROMPTS) + 1 + tokens


def observe(run, tokens: int, replay: list | None = None, bar=None) -> dict:
    """Everything parity compares, computed on one backend (a sparse model: taping its router decisions,
    or executing `replay`, the reference's); bar: a progress bar to advance (steps())."""
    def tick(value):
        if bar is not None:
            bar.update(1)
        return value

    sparse = sparse_mlp if run.spec.sparse else None
    routes = sparse.tape_routes(run.model, replay) if sparse else None
    enc = [run.tokenizer.encode(p) for p in PROMPTS]
    out = {
        "logits": [tick(run.backend.logits(run.model, np.array([ids]))[0]) for ids in enc],
        "hidden": tick(run.backend.hidden_states(run.model, np.array([enc[0]]))),
        "greedy": [tick(t) for t in generate_tokens(run.backend, run.model, enc[1], tokens)],
        "device": run.backend.device_name(),
        "resident_weight_bytes": accounted(run.spec, run.dtype, 0)["resident_weight_bytes"],
        **{k: run.memory[k] for k in MEMORY},
        "peak_memory_bytes": memory.peak_bytes(run.backend),
        "routes": routes,
    }
    if sparse:
        sparse.untape_routes(run.model)
    return out


def route_agreement(a: list, b: list) -> float:
    """Fraction of equal keep/skip decisions over every layer, token and neuron (each layer's calls joined in
    token order: the backends may split a prompt's prefill into different calls)."""
    same = total = 0
    for la, lb in zip(a, b):
        x, y = np.concatenate(la), np.concatenate(lb)
        if x.shape != y.shape:
            raise DnError(f"parity: the backends routed {x.shape[0]} and {y.shape[0]} tokens")
        same, total = same + int((x == y).sum()), total + x.size
    return same / max(1, total)


def compare(a: dict, b: dict, dtype: str) -> dict:
    tol = PARITY[dtype]
    errs = np.concatenate([rel_err(x, y) for x, y in zip(a["logits"], b["logits"])])
    layer_errs = [float(rel_err(x.ravel(), y.ravel())) for x, y in zip(a["hidden"], b["hidden"])]
    first = next((i for i, e in enumerate(layer_errs) if e > tol.hidden_rel_err), None)
    n = len(a["greedy"])
    agreement = sum(x == y for x, y in zip(a["greedy"], b["greedy"])) / n
    passed = bool(errs.max() <= tol.max_rel_err and
                  (tol.greedy_agreement is None or agreement >= tol.greedy_agreement))
    routes = None
    if a.get("routes") is not None:
        routes = route_agreement(a["routes"], b["routes"])
        passed = passed and routes >= ROUTE_AGREEMENT
    return {"passed": passed, "max_rel_err": float(errs.max()), "mean_rel_err": float(errs.mean()),
            "route_agreement": routes,
            "greedy_agreement": agreement, "tokens_compared": n, "positions_compared": int(errs.size),
            "first_divergent_layer": first, "layer_rel_err": layer_errs,
            "thresholds": {"max_rel_err": tol.max_rel_err, "greedy_agreement": tol.greedy_agreement,
                           "hidden_rel_err": tol.hidden_rel_err, "route_agreement": ROUTE_AGREEMENT}}


def run_parity(model: str | None, backends: list[str], dtype: str, tokens: int) -> dict:
    seen = {}
    with cli.progress(len(backends) * steps(tokens), "dn parity", "step") as bar:
        for name in backends:  # one model in memory at a time; the second replays the first's routing
            bar.set_postfix_str(f"loading {name}")
            run = loader.load(model, name, dtype)
            bar.set_postfix_str(name)
            seen[name] = observe(run, tokens, seen[backends[0]]["routes"] if seen else None, bar)
            del run
            gc.collect()
    a, b = (seen[n] for n in backends)
    report = compare(a, b, dtype)
    report.update(model=str(model or "default"), dtype=dtype, reference=backends[0],
                  sparse=seen[backends[0]]["routes"] is not None,
                  backends={n: {k: seen[n][k] for k in ("device", "resident_weight_bytes", *MEMORY,
                                                        "peak_memory_bytes")} for n in backends})
    return report


def _main(argv) -> int:
    args = setup_arg_parser().parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if len(backends) != 2 or backends[0] == backends[1]:
        raise DnError(f"--backends needs two different backends, got {args.backends!r}")
    r = run_parity(args.model, backends, args.dtype, args.tokens)
    print(f"parity {backends[0]} vs {backends[1]} ({args.dtype}): max rel err {r['max_rel_err']:.2e} "
          f"(<= {r['thresholds']['max_rel_err']:.0e}), mean {r['mean_rel_err']:.2e} over "
          f"{r['positions_compared']} positions; greedy agreement {r['greedy_agreement']:.3f} over "
          f"{r['tokens_compared']} tokens; first divergent layer {r['first_divergent_layer']}"
          + ("" if r["route_agreement"] is None else
             f"; router decisions agree {r['route_agreement']:.5f} (>= {ROUTE_AGREEMENT}), logits and tokens "
             f"compared under the reference's routing"))
    for name, m in r["backends"].items():
        print(f"  {name:<6} {m['device']:<12} resident weights {m['resident_weight_bytes'] / 2**20:8.1f} MiB "
              f"accounted, {m['measured_resident_bytes'] / 2**20:8.1f} MiB measured ({m['measured_kind']}), "
              f"load peak {m['load_peak_bytes'] / 2**20:8.1f} MiB, peak {m['peak_memory_bytes'] / 2**20:8.1f} MiB")
    print("PASSED" if r["passed"] else "FAILED")
    if args.json:
        write_json(r, args.json)
    return 0 if r["passed"] else BREACH


def main(argv=None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
