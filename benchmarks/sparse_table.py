"""Markdown tables of sparse quality runs (the JSON written by sparse_quality.py), for docs/sparsity.md.
    python benchmarks/sparse_table.py docs/results/sparse-quality-torch.json docs/results/sparse-quality-mlx.json
"""

from __future__ import annotations

import json
import sys

import numpy as np


def table(result: dict) -> str:
    head = (f"{result['backend']} (fit via {result['fit_backend']}), {result['eval_tokens']} eval tokens, "
            f"{result['calib_tokens']} calibration tokens, greedy {result['gen_tokens']} tokens x "
            f"{result['prompts']} prompts, router {result['router']}, selection {result['select']}\n\n")
    lines = ["| sparsity | prior | router | kept on eval | ppl | Δ vs dense | agreement: prefix | tokens |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result.get("records", result.get("rows")):  # "rows": the JSON written before dn.runtime.timing.report
        kept = f"{r['kept_on_eval']:.3f}" if "kept_on_eval" in r else "1"
        lines.append(f"| {r['sparsity']} | {r['prior']} | {r.get('router', '-')} | {kept} | {r['ppl']:.3f} | "
                     f"{100 * r['delta']:+.2f}% | {r['agree']:.3f} | {r.get('agree_tokens', 1.0):.3f} |")
    recall = ["", "Router recall against the oracle at the same per-token count (first eval window), per layer:"]
    for s, v in result["recall_per_layer"].items():
        recall.append(f"- sparsity {s}: mean {np.mean(v):.3f}, min {np.min(v):.3f} (layer {int(np.argmin(v))}), "
                      f"max {np.max(v):.3f}; all: {', '.join(f'{x:.3f}' for x in v)}")
    return head + "\n".join(lines + recall) + f"\n\nCommand: `{result['command']}`\n"


def main(argv=None) -> int:
    for path in (argv if argv is not None else sys.argv[1:]):
        with open(path) as f:
            print(table(json.load(f)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
