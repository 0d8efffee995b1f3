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


def _two_panels(path, series: dict[str, list[tuple]], xlabel: str, ylabels: tuple[str, str], symlog: bool = False,
                from_zero: bool = False) -> None:
    """A PNG of two scatter panels; series: {legend label: [(panel 0 or 1, x, y, annotation)]}."""
    import matplotlib  # optional (dn bench --plot): late, so a run without a plot needs no matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for (label, pts), marker in zip(series.items(), "osD^v<>p*"):
        for i, ax in enumerate(axes):
            mine = [p for p in pts if p[0] == i]
            ax.scatter([p[1] for p in mine], [p[2] for p in mine], marker=marker, label=label, alpha=0.8)
            for _, x, y, name in mine:
                ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if symlog:
        axes[0].set_yscale("symlog", linthresh=1)
    for ax, ylabel in zip(axes, ylabels):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if from_zero:
            ax.set_xlim(left=0)
        if series:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(records: list[dict], path: str | Path) -> None:
    """Resident fraction of dense bf16 against perplexity delta and against decode tokens/s (batch 1)."""
    rows = [r for r in records if "error" not in r and r["batch"] == min(x["batch"] for x in records)]
    series = {}
    for r in sorted(rows, key=lambda r: (r["backend"], r["dtype"])):
        pts = series.setdefault(f"{r['backend']} {r['dtype']}", [])
        pts += [(i, 100 * r["resident_fraction"], r[key], r["config"])
                for i, key in enumerate(("ppl_delta_pct", "tokens_per_s")) if r.get(key) is not None]
    _two_panels(path, series, "resident weight bytes, % of dense bf16 (accounted)",
                ("perplexity Δ vs dense (%, symlog)", f"decode tokens/s (batch {rows[0]['batch'] if rows else 1})"),
                symlog=True)


def _name(r: dict) -> str:
    """A record's row name: dn's `config dtype`; a peer's memory mode, `(best)` on llama.cpp's best one."""
    return f"{r['config']} {r.get('dtype') or ''}".strip() + (" (best memory)" if r.get("best_memory_mode") else "")


PEER_FIELDS = ("tokens_per_s", "latency_ms_p50", "latency_ms_p99", "prefill_tokens_per_s", "process_peak_bytes",
               "framework_baseline_bytes", None, "ppl")  # the figure columns of peer_table (None: peak - baseline)


def peer_table(records: list[dict], model: str = "", braces: bool = False) -> str:
    """dn's records beside the peers', batch 1: decode and prefill tok/s, the process's peak and framework baseline
    (max RSS; peak - baseline is what the model costs the process) and perplexity with how it was scored. braces:
    each figure as {figure} (docs/figures.json's rows, in PEER_FIELDS order)."""
    head = ["model", "backend", "config", "tok/s", "p50 ms", "p99 ms", "prefill tok/s", "peak MiB", "baseline MiB",
            "peak - baseline MiB", "ppl", "ppl scoring (tokens)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        if r.get("batch") != 1:
            continue
        name = Path(r.get("model") or model).name
        if "skipped" in r or "error" in r:
            why = ("skipped: " + r["skipped"]) if "skipped" in r else ("failed: " + r["error"])
            lines.append(f"| {name} | {r['backend']} | {r['config']} | {why.replace('|', '/')} |"
                         + " |" * (len(head) - 4))
            continue
        scored = "–" if r.get("ppl") is None else f"{r['ppl_scoring']} ({r['eval_tokens']})"
        figs = [f"{r['tokens_per_s']:.1f}", f"{r['latency_ms_p50']:.1f}", f"{r['latency_ms_p99']:.1f}",
                f"{r['prefill_tokens_per_s']:.0f}", _mib(r.get("process_peak_bytes")),
                _mib(r.get("framework_baseline_bytes")), _mib(_above(r)),
                "–" if r.get("ppl") is None else f"{r['ppl']:.4f}"]
        figs = [f"{{{f}}}" if braces and f != "–" else f for f in figs]
        lines.append("| " + " | ".join([name, r["backend"], _name(r), *figs, scored]) + " |")
    return "\n".join(lines) + "\n"


def _above(r: dict) -> int | None:
    if r.get("process_peak_bytes") is None or r.get("framework_baseline_bytes") is None:
        return None
    return r["process_peak_bytes"] - r["framework_baseline_bytes"]


def peer_plot(records: list[dict], path: str | Path) -> None:
    """Two panels over dn's and the peers' batch-1 records: perplexity against the process's peak above its framework
    baseline, and decode tokens/s against the same."""
    rows = [r for r in records if r.get("batch") == 1 and "tokens_per_s" in r and _above(r) is not None]
    series = {}
    for r in rows:
        pts = series.setdefault(r["backend"] if r["backend"] in ("llama.cpp", "mlx-lm") else f"dn ({r['backend']})", [])
        if r.get("ppl") is not None and r.get("best_memory_mode") is not False:  # a peer's modes share one ppl
            pts.append((0, _above(r) / 2**20, r["ppl"], _name(r)))
        pts.append((1, _above(r) / 2**20, r["tokens_per_s"], _name(r)))
    scorings = sorted({r["ppl_scoring"] for r in rows if r.get("ppl") is not None})
    _two_panels(path, series, "process peak above its framework baseline (MiB, max RSS)",
                (f"perplexity (scoring: {', '.join(scorings) or 'none'})", "decode tokens/s (batch 1)"),
                from_zero=True)
