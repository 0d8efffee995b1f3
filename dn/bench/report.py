"""dn bench's report: deltas and ratios against dense measured in the same run, the markdown table and the plot.
dense is the model's dense form (a GGUF's bf16 widening); native, the form it loads in by default, is a row like
the others, so its cost and gain against the widening read off the table."""

from __future__ import annotations

from pathlib import Path


def relate(records: list[dict]) -> None:
    """Deltas and ratios against dense on the same backend, dtype and batch, measured in the same run."""
    dense = {(r["backend"], r["dtype"], r["batch"]): r for r in records
             if r["config"] == "dense" and "error" not in r}
    for r in records:
        d = dense.get((r["backend"], r["dtype"], r["batch"]))
        if "error" in r or d is None:
            continue
        r["ppl_delta_pct"] = None if r["ppl"] is None or d["ppl"] is None else 100 * (r["ppl"] / d["ppl"] - 1)
        r["speed_vs_dense"] = r["tokens_per_s"] / d["tokens_per_s"]
        r["prefill_vs_dense"] = r["prefill_tokens_per_s"] / d["prefill_tokens_per_s"]


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _mib(x) -> str:
    return "–" if x is None else f"{x / 2**20:.1f}"


def table(records: list[dict]) -> str:
    """The records as a markdown table (fractions of dense bf16; speed ratios against dense in the same run)."""
    he = any("humaneval_pass_at_1" in r for r in records)
    head = ["config", "backend", "dtype", "batch", "resident (accounted)", "resident (measured)",
            "peak generating MiB", "ppl", "Δ ppl", "tok/s", "vs dense", "p50 ms", "p99 ms", "prefill tok/s",
            "vs dense", "agreement"] + (["HumanEval pass@1", "HumanEval agreement"] if he else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['backend']} | {r['dtype']} | {r['batch']} | failed: "
                         f"{r['error'].replace('|', '/')} |" + " |" * (len(head) - 5))
            continue
        delta = r.get("ppl_delta_pct")
        cells = [r["config"], r["backend"], r["dtype"], str(r["batch"]), _pct(r["resident_fraction"]),
                 _pct(r["measured_fraction"]), _mib(r["resident_peak_bytes"]),
                 "–" if r["ppl"] is None else f"{r['ppl']:.4f}",
                 "–" if delta is None else f"{delta:+.2f}%", f"{r['tokens_per_s']:.1f}",
                 "–" if r.get("speed_vs_dense") is None else f"{r['speed_vs_dense']:.2f}x",
                 f"{r['latency_ms_p50']:.1f}", f"{r['latency_ms_p99']:.1f}", f"{r['prefill_tokens_per_s']:.0f}",
                 "–" if r.get("prefill_vs_dense") is None else f"{r['prefill_vs_dense']:.2f}x",
                 "–" if r["greedy_agreement"] is None else f"{r['greedy_agreement']:.3f}"]
        if he:
            cells += ["–" if r.get(k) is None else f"{r[k]:.3f}"
                      for k in ("humaneval_pass_at_1", "humaneval_agreement")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: str | Path) -> None:
    """Resident fraction of dense bf16 against perplexity delta and against decode tokens/s (batch 1)."""
    import matplotlib  # optional (dn bench --plot): late, so a run without a plot needs no matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed

    rows = [r for r in records if "error" not in r and r["batch"] == min(x["batch"] for x in records)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    series = sorted({(r["backend"], r["dtype"]) for r in rows})
    for (backend, dtype), marker in zip(series, "osD^v<>p*"):
        pts = [r for r in rows if (r["backend"], r["dtype"]) == (backend, dtype)]
        for ax, key in zip(axes, ("ppl_delta_pct", "tokens_per_s")):
            xs = [100 * r["resident_fraction"] for r in pts if r.get(key) is not None]
            ys = [r[key] for r in pts if r.get(key) is not None]
            ax.scatter(xs, ys, marker=marker, label=f"{backend} {dtype}", alpha=0.8)
            for r in pts:
                if r.get(key) is not None:
                    ax.annotate(r["config"], (100 * r["resident_fraction"], r[key]), fontsize=7,
                                xytext=(3, 3), textcoords="offset points")
    axes[0].set_yscale("symlog", linthresh=1)
    axes[0].set_ylabel("perplexity Δ vs dense (%, symlog)")
    axes[1].set_ylabel(f"decode tokens/s (batch {rows[0]['batch'] if rows else 1})")
    for ax in axes:
        ax.set_xlabel("resident weight bytes, % of dense bf16 (accounted)")
        ax.grid(alpha=0.3)
        if rows:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
