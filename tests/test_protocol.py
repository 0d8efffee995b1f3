"""Both backend packages satisfy the Protocols in dn/ (the package: Backend; its ops module: Ops plus the optional
kernel groups it declares), and their other modules mirror each other."""

import importlib
import inspect
import pkgutil
import subprocess
import sys

import pytest

from dn.runtime.backend import CAPABILITIES, Backend, Ops

PACKAGES = ["dn_mlx", "dn_torch"]


def _members(protocol) -> list[str]:
    """Its methods and its annotated attributes (NAME, resident, CAPABILITIES)."""
    return sorted({n for n in [*dir(protocol), *protocol.__annotations__] if not n.startswith("_")})


def _signature(obj) -> list[str]:
    # Compare parameter names and kinds; annotations differ only in the framework types they name.
    params = list(inspect.signature(obj).parameters.values())
    return [f"{p.name}:{p.kind}:{p.default is inspect.Parameter.empty}" for p in params if p.name != "self"]


def _satisfies(module, protocol) -> None:
    for name in _members(protocol):
        assert hasattr(module, name), f"{module.__name__} lacks {name}"
        proto = getattr(protocol, name, None)
        if callable(proto):
            assert _signature(getattr(module, name)) == _signature(proto), f"{module.__name__}.{name} signature"


@pytest.mark.parametrize("package", PACKAGES)
def test_backend_satisfies_protocol(package):
    _satisfies(importlib.import_module(package), Backend)


@pytest.mark.parametrize("package", PACKAGES)
def test_ops_satisfy_protocol_and_declare_their_capabilities(package):
    """A backend's ops: every Ops function; each capability it declares brings its group's functions, and one it
    does not declare brings none of them (no stubs that raise, no checks that always say no); nothing else public."""
    ops = importlib.import_module(f"{package}.ops")
    _satisfies(ops, Ops)
    assert isinstance(ops.CAPABILITIES, frozenset) and not ops.CAPABILITIES - set(CAPABILITIES), ops.CAPABILITIES
    for capability, group in CAPABILITIES.items():
        if capability in ops.CAPABILITIES:
            _satisfies(ops, group)
        else:
            present = [n for n in _members(group) if hasattr(ops, n)]
            assert not present, f"{package}.ops does not declare {capability} but has {present}"
    contract = {n for p in (Ops, *CAPABILITIES.values()) for n in _members(p)}
    public = {n for n, f in vars(ops).items() if inspect.isfunction(f) and not n.startswith("_")}
    assert public <= contract, f"{package}.ops has {sorted(public - contract)} outside dn.runtime.backend.Ops"


@pytest.mark.parametrize("package,capabilities", [("dn_torch", {"native_sparse", "native_planes", "fused_sparse"}),
                                                  ("dn_mlx", {"fused_sparse"})])
def test_capabilities_are_what_each_backend_has(package, capabilities):
    declared = importlib.import_module(f"{package}.ops").CAPABILITIES
    assert declared == capabilities


def _public_functions(module) -> dict[str, list[str]]:
    return {n: _signature(f) for n, f in vars(module).items()
            if inspect.isfunction(f) and not n.startswith("_") and f.__module__ == module.__name__}


def _submodules(package: str) -> set[str]:
    modules = pkgutil.iter_modules(importlib.import_module(package).__path__)
    return {m.name for m in modules if not m.name.startswith("_")}  # private kernels may differ


# checked against dn.runtime.backend's Protocols instead (ops), or each backend's own by design (kernels: C and Triton,
# Metal; gguf: torch runs the blocks through C kernels, MLX moves them into its affine layout or decodes them)
NOT_MIRRORED = {"ops", "kernels", "gguf"}


def test_backend_packages_mirror_each_other():
    names = _submodules("dn_mlx")
    assert names == _submodules("dn_torch")
    for name in sorted(names - NOT_MIRRORED):
        mlx = _public_functions(importlib.import_module(f"dn_mlx.{name}"))
        torch = _public_functions(importlib.import_module(f"dn_torch.{name}"))
        assert mlx == torch, f"dn_mlx.{name} and dn_torch.{name} differ"


def test_core_imports_no_framework():
    modules = sorted(m.name for m in pkgutil.walk_packages(importlib.import_module("dn").__path__, "dn."))
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules) +
            "bad = [m for m in ('torch', 'mlx', 'transformers', 'mlx_lm') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# Kernel micro-benchmarks time one backend's kernels on its own arrays, as that backend's tests do (bench_decode:
# torch's decode step with and without its C ops, which no Protocol names).
KERNEL_BENCHMARKS = {"bench_codec.py", "bench_quant.py", "bench_sparse.py", "bench_fixed4_mlx.py", "bench_gguf.py",
                     "bench_decode.py"}


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
