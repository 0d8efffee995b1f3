"""Both backend packages satisfy the one Protocol in dn/, and their modules mirror each other."""

import importlib
import inspect
import pkgutil
import subprocess
import sys

import pytest

from dn.runtime.backend import Backend


def _members(protocol) -> list[str]:
    return [n for n in dir(protocol) if not n.startswith("_")]


def _signature(obj) -> list[str]:
    # Compare parameter names and kinds; annotations differ only in the framework types they name.
    params = list(inspect.signature(obj).parameters.values())
    return [f"{p.name}:{p.kind}:{p.default is inspect.Parameter.empty}" for p in params if p.name != "self"]


@pytest.mark.parametrize("package", ["dn_mlx", "dn_torch"])
def test_backend_satisfies_protocol(package):
    module = importlib.import_module(package)
    for name in _members(Backend):
        assert hasattr(module, name), f"{package} lacks {name}"
        proto = getattr(Backend, name)
        if callable(proto):
            assert _signature(getattr(module, name)) == _signature(proto), f"{package}.{name} signature"


def _public_functions(module) -> dict[str, list[str]]:
    return {n: _signature(f) for n, f in vars(module).items()
            if inspect.isfunction(f) and not n.startswith("_") and f.__module__ == module.__name__}


def _submodules(package: str) -> set[str]:
    modules = pkgutil.iter_modules(importlib.import_module(package).__path__)
    return {m.name for m in modules if not m.name.startswith("_")}  # private kernels may differ


def test_backend_packages_mirror_each_other():
    names = _submodules("dn_mlx")
    assert names == _submodules("dn_torch")
    for name in sorted(names):
        mlx = _public_functions(importlib.import_module(f"dn_mlx.{name}"))
        torch = _public_functions(importlib.import_module(f"dn_torch.{name}"))
        assert mlx == torch, f"dn_mlx.{name} and dn_torch.{name} differ"


def test_core_imports_no_framework():
    modules = sorted(m.name for m in pkgutil.walk_packages(importlib.import_module("dn").__path__, "dn."))
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules) +
            "bad = [m for m in ('torch', 'mlx', 'transformers', 'mlx_lm') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# Kernel micro-benchmarks time one backend's kernels on its own arrays, as that backend's tests do.
KERNEL_BENCHMARKS = {"bench_codec.py", "bench_quant.py", "bench_sparse.py", "bench_fixed4_mlx.py"}


def test_nothing_reaches_into_a_backend_but_through_the_protocol():
    """dn/, parity/ and the benchmarks get a backend from dn.runtime.backend.get (the package, which satisfies the
    Protocol); none imports a backend's modules by name."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    files = [f for d in ("dn", "parity", "benchmarks") for f in sorted((root / d).glob("*.py"))
             if f.name not in KERNEL_BENCHMARKS]
    pattern = re.compile(r"(from|import)\s+dn_(torch|mlx)\b|dn_\{[^}]*\}\.|__import__\(")
    found = [f"{f.relative_to(root)}:{i}" for f in files
             for i, line in enumerate(f.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, found
