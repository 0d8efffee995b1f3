"""dn bench --peers' JSON -> the table of dn's and the peers' records, the two-panel plot (perplexity and decode tok/s,
each against the process's peak above its framework baseline), and docs/figures.json's rows for the table as pasted
into a doc (scripts/check_figures.py then checks every figure against the JSON).

    python benchmarks/peers_report.py docs/results/bench-peers-default-1t.json [--markdown OUT.md] [--plot OUT.png]
        [--figures docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dn.bench import report

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"
SELECT = ("backend", "config", "dtype", "batch")  # what names one record


def figure_rows(result: dict, json_path: Path, doc: str) -> list[list[str]]:
    """[doc, table row with {figures}, source of each figure] for each measured batch-1 record."""
    file = json_path.resolve().relative_to(RESULTS).as_posix()
    model = _label(result)
    braced = report.peer_table(result["records"], model, braces=True).splitlines()[2:]
    rows = [r for r in result["records"] if r.get("batch") == 1]
    out = []
    for r, line in zip(rows, braced):
        if "skipped" in r or "error" in r:
            continue
        sel = ",".join(f"{k}={r[k]}" for k in SELECT if r.get(k) is not None)
        hits = [x for x in result["records"] if all(str(x.get(k)) == v for k, v in
                                                    (c.split("=", 1) for c in sel.split(",")))]
        assert len(hits) == 1, f"records[{sel}] matches {len(hits)}"
        src = f"{file}:records[{sel}]"
        sources = []
        for key in report.PEER_FIELDS:
            if key is None:
                sources.append(f"({{{src}.process_peak_bytes}} - {{{src}.framework_baseline_bytes}}) / MiB")
            elif key.endswith("_bytes"):
                sources.append(f"{{{src}.{key}}} / MiB")
            elif r.get(key) is not None:
                sources.append(f"{src}.{key}")
        out.append([doc, line, *sources])
    return out


def _label(result: dict) -> str:
    """dn's rows' model: the GGUF llama.cpp ran, the same file; else the model as dn bench was given it."""
    gguf = next((r["model"] for r in result["records"] if r.get("backend") == "llama.cpp" and "model" in r), None)
    return gguf or result.get("model") or ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", help="dn bench --peers' JSON (under docs/results/ for --figures)")
    p.add_argument("--markdown", default=None)
    p.add_argument("--plot", default=None, help="PNG (matplotlib)")
    p.add_argument("--figures", default=None, metavar="DOC", help="print docs/figures.json rows for DOC's table")
    args = p.parse_args(argv)
    path = Path(args.json)
    result = json.loads(path.read_text())
    md = report.peer_table(result["records"], _label(result))
    if args.markdown:
        Path(args.markdown).write_text(md)
    if args.plot:
        report.peer_plot(result["records"], args.plot)
    if args.figures:
        for row in figure_rows(result, path, args.figures):
            print(json.dumps(row, ensure_ascii=False))
    else:
        print(md, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
