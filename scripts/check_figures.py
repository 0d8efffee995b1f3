"""Check the measured figures of README.md and docs/*.md against the JSON each came from (docs/results/).

    python scripts/check_figures.py          # one line per problem; exit 1 if any

The list is docs/figures.json. Each row of its `figures` is [doc, text, source, ...]: the doc must contain `text`
with its braces removed, and each `{...}` in `text` is a figure as written, whose value the matching source gives.
A source is `FILE:PATH`: FILE under docs/results/, PATH through dicts and lists (`a.b[0]`; `a['0.5']` for a key
with dots; `[k=v,k2=v2]` for the one list item with those values). Or it is an expression over such fields in
braces: `100 * {a.json:x} / {b.json:y}`, `min({a.json:x}, {a.json:y})`, `sum({a.json:list})`, with MiB = 2**20.
The figure must equal the value written the way the figure is: as many decimals (or digits after the point in
`1.2e-04`), thousands commas if it has them; a leading `+` is a sign. The doc must also name each FILE it quotes
(its path, or for a file in a subfolder of docs/results/ that folder), where the command that wrote it stands.

`covered` lists the docs in which every figure-like number (followed by x, %, MiB, GB, ms, tok/s, bits/weight, or
written 1e-4) must lie inside a `figures` text, a `not_measured` text ([doc, text, why]: targets, flags,
thresholds, sizes by design, other tools' published figures) or a `skip` section ([doc, heading]: a section whose
figures another check owns): a figure added there without a source fails the check.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "docs/figures.json"
RESULTS = ROOT / "docs/results"
NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?")
FIGURE_LIKE = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+|(?=x\b)|(?= ?%)|"
                         r"(?= ?(?:MiB|GiB|MB|GB/s|GB|ms|µs|tok/s|bits/weight|bits a weight)))")


@functools.cache
def _load(file: str):
    return json.loads((RESULTS / file).read_text())


def field(source: str):
    """The value at FILE:PATH."""
    file, _, path = source.partition(":")
    o = _load(file)
    for part in re.findall(r"\[[^\]]*\]|[^.\[\]]+", path):
        if not part.startswith("["):
            o = o[part]
        elif part[1] in "'\"":  # a key with dots in it: ['0.5']
            o = o[part[2:-2]]
        elif "=" in part:
            conds = [c.split("=", 1) for c in part[1:-1].split(",")]
            hits = [x for x in o if all(str(x.get(k)) == v for k, v in conds)]
            if len(hits) != 1:
                raise KeyError(f"{part} matches {len(hits)} items")
            o = hits[0]
        else:
            o = o[int(part[1:-1])]
    return o


def value(source: str) -> float:
    if "{" not in source:
        return float(field(source))
    expr = re.sub(r"\{([^{}]+)\}", lambda m: repr(field(m.group(1))), source)
    names = {"MiB": 2**20, "min": min, "max": max, "sum": sum, "len": len, "round": round}
    return float(eval(expr, {"__builtins__": {}}, names))  # the table's arithmetic, over numbers and lists only


def written(v: float, figure: str) -> str:
    """v written the way `figure` is: its decimals, its thousands commas."""
    fig = figure.lstrip("+")
    mantissa = fig.split("e")[0]
    places = len(mantissa.split(".")[1]) if "." in mantissa else 0
    s = f"{v:.{places}e}" if "e" in fig else f"{v:{',' if ',' in fig else ''}.{places}f}"
    return s.lstrip("-") if float(s.replace(",", "")) == 0 else s


def files_of(source: str) -> list[str]:
    return [s.partition(":")[0] for s in (re.findall(r"\{([^{}]+)\}", source) if "{" in source else [source])]


def cited(body: str, file: str) -> bool:
    return file in body or ("/" in file and f"docs/results/{file.split('/')[0]}/" in body)


def check(root: Path = ROOT, table: dict | None = None) -> list[str]:
    """Every problem, one line each: a text missing from its doc, a figure that is not its field, an uncited JSON, a
    figure-like number of a covered doc that no row accounts for."""
    table = table or json.loads(TABLE.read_text())
    errors, docs, spans = [], {}, {}

    def find(doc, text):  # the first place, and every place marked as accounted for
        body = docs.setdefault(doc, (root / doc).read_text())
        at = body.find(text)
        spans.setdefault(doc, []).extend((m.start(), m.end()) for m in re.finditer(re.escape(text), body))
        return body, at

    for doc, text, *sources in table["figures"]:
        body, at = find(doc, text.replace("{", "").replace("}", ""))
        if at < 0:
            errors.append(f"{doc}: text not found: {text!r}")
            continue
        figures = re.findall(r"\{([^{}]*)\}", text)
        if len(figures) != len(sources):
            errors.append(f"{doc}: {len(figures)} figures, {len(sources)} sources: {text!r}")
            continue
        for fig, src in zip(figures, sources):
            try:
                if not NUMBER.fullmatch(fig):
                    raise ValueError("not a number")
                v = value(src)
            except (KeyError, IndexError, TypeError, ValueError, OSError) as e:
                errors.append(f"{doc}: {fig!r}: {src}: {e!r}")
                continue
            if written(v, fig) != fig.lstrip("+") or (fig.startswith("+") and v < 0):
                errors.append(f"{doc}: {fig} is {written(v, fig)} in {src} ({v!r})")
            errors += [f"{doc}: quotes {f} without naming it" for f in files_of(src) if not cited(body, f)]
    for doc, text, *_why in table["not_measured"]:
        if find(doc, text)[1] < 0:
            errors.append(f"{doc}: not_measured text not found: {text!r}")
    for doc, heading in table["skip"]:  # a section someone else writes: not covered
        body, at = find(doc, heading)
        if at < 0:
            errors.append(f"{doc}: skipped section not found: {heading!r}")
        else:
            end = body.find("\n## ", at + len(heading))
            spans.setdefault(doc, []).append((at, len(body) if end < 0 else end))
    for doc in table["covered"]:
        body = docs.setdefault(doc, (root / doc).read_text())
        for m in FIGURE_LIKE.finditer(body):
            if not any(a <= m.start() < b for a, b in spans.get(doc, [])):
                line = body.count("\n", 0, m.start()) + 1
                errors.append(f"{doc}:{line}: {m.group(0)!r} is neither in `figures` nor in `not_measured`")
    return errors


def main() -> int:
    errors = check()
    print("\n".join(errors + [f"{len(json.loads(TABLE.read_text())['figures'])} rows: "
                              f"{f'{len(errors)} problems' if errors else 'every figure matches its JSON'}"]))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
