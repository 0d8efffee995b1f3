"""The architecture as a test (docs/DESIGN.md): dn/'s wings in layers, no import circles anywhere, imports inside
functions only for optional heavy dependencies, no file in dn/ over 500 lines, and backends that do not copy each
other. Read from the source with ast, so nothing is imported."""

from __future__ import annotations

import ast
import difflib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dn", "dn_mlx", "dn_torch", "parity")
# dn/'s layers, bottom first: a module may import its own layer and the ones below it.
LAYERS = ("dn.core", "dn.formats", "dn.model", "dn.runtime", "dn")
MAX_UP = 1
MAX_LINES = 500
MAX_SHARED = 0.15


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = f
    return mods


MODULES = _modules()


def _target(name: str, names: list[str]) -> list[str]:
    """The project modules an import reaches: `from pkg import sub` reaches pkg.sub, not pkg."""
    hits = [f"{name}.{n}" for n in names if f"{name}.{n}" in MODULES]
    if len(hits) < len(names) and name in MODULES:
        hits.append(name)
    return hits


def _imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for each import in module."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name in MODULES]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = _target(base, [a.name for a in node.names])
        else:
            continue
        out += [(t, node.lineno, id(node) in inner) for t in targets if t != module]
    return out


def _layer(module: str) -> int | None:
    if module == "dn":
        return len(LAYERS)  # the public API sits on top
    if not module.startswith("dn."):
        return None
    return max(i for i, prefix in enumerate(LAYERS) if module == prefix or module.startswith(prefix + "."))


def test_no_import_circles():
    graph = {m: {t for t, _, _ in _imports(m)} for m in MODULES}
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for m in MODULES:
        if m not in index:
            visit(m)
    assert not cycles, cycles


def test_dn_layers_point_down():
    up = [f"{m}:{line} -> {t}" for m in MODULES if m.startswith("dn.") for t, line, _ in _imports(m)
          if _layer(t) is not None and _layer(t) > _layer(m)]
    assert len(up) <= MAX_UP, up


def test_imports_inside_functions_are_optional_dependencies_with_a_reason():
    """A project module is imported at the top; an import inside a function is an optional heavy dependency and
    says why in a comment on its line or the line above."""
    bad = []
    for m, path in MODULES.items():
        lines = path.read_text().splitlines()
        bad += [f"{m}:{line} imports {t}" for t, line, inner in _imports(m) if inner]
        tree = ast.parse(path.read_text())
        for f in ast.walk(tree):
            if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(f):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0):
                    near = lines[node.lineno - 1] + (lines[node.lineno - 2] if node.lineno > 1 else "")
                    if "#" not in near:
                        bad.append(f"{m}:{node.lineno} has no comment saying why it imports late")
    assert not bad, "\n".join(sorted(set(bad)))


def test_no_file_in_dn_is_long():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "dn").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def _code_lines(path: Path) -> list[str]:
    out = []
    for line in path.read_text().splitlines():
        s = line.strip()
        if s and not s.startswith(("#", "import ", "from ")):
            out.append(s)
    return out


def shared_share(a: Path, b: Path) -> float:
    """Lines that are the same and in the same order, as a share of the smaller file (imports left out)."""
    x, y = _code_lines(a), _code_lines(b)
    if not x or not y:
        return 0.0
    same = sum(block.size for block in difflib.SequenceMatcher(None, x, y, autojunk=False).get_matching_blocks())
    return same / min(len(x), len(y))


@pytest.mark.parametrize("name", sorted({p.name for p in (ROOT / "dn_mlx").glob("*.py")}
                                        & {p.name for p in (ROOT / "dn_torch").glob("*.py")}))
def test_backends_do_not_copy_each_other(name):
    share = shared_share(ROOT / "dn_mlx" / name, ROOT / "dn_torch" / name)
    assert share <= MAX_SHARED, f"dn_mlx/{name} and dn_torch/{name} share {share:.0%} of their lines"
