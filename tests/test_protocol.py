"""Both backend packages satisfy the one Protocol in dn/, and their modules mirror each other."""

import importlib
import inspect
import pkgutil
import subprocess
import sys

import pytest

from dn.backend import Backend


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
    modules = sorted(f"dn.{m.name}" for m in pkgutil.iter_modules(importlib.import_module("dn").__path__))
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules) +
            "bad = [m for m in ('torch', 'mlx', 'transformers', 'mlx_lm') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)
