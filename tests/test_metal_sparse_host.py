"""Host check of the sparse-MLP Metal kernels (metal/sparse_hidden.metal, metal/sparse_down.metal; Metal cannot
run on Linux). Each body is compiled as C++ through metal/shim inside the signature MLX 0.32 generates for it
(concrete `const device T*` inputs named as in dn_mlx.kernels.metal_step, `device float*` outputs, the
attributes the body names; template arguments as constants) and run over its whole 1-D grid by
metal/shim/mlx_launch.h (threadgroups of the launch's size, the last one short, simd_sum a real collective of
32 lanes), under AddressSanitizer (the bodies do pointer arithmetic on raw buffer pointers, so any access
outside a buffer is reported) and UBSan, with NaN-poisoned outputs, in three thread orders. Results are compared
with float64 numpy within dn.core.tolerances.KERNEL. dn_mlx.sparse's Metal path itself runs through the same host
kernels with mx.fast.metal_kernel replaced, and mutated bodies and launch code show the check catches bugs."""

from __future__ import annotations

import hashlib
import inspect
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dn.core.tensors import bf16_to_f32, f32_to_bf16
from dn.core.tolerances import KERNEL

ROOT = Path(__file__).resolve().parent.parent
SHIM = ROOT / "metal" / "shim"
GXX = shutil.which("g++")
pytestmark = [
    pytest.mark.skipif(GXX is None, reason="g++ not found: the host check compiles kernels as C++"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the Metal host shim targets Linux"),
]
ORDERS = (0, 1, 2)  # thread order between collectives: index, reversed, shuffled (as tests/test_metal_host.py)
DTYPES = ("float32", "bfloat16", "float16")
HIDDEN_IN, DOWN_IN = ("x", "bundled", "idx", "c"), ("h", "bundled", "idx", "y0")  # as metal_step launches
SIMDGROUPS = 4  # metal_step's default: 4 simdgroups per sparse_hidden threadgroup

_C_TYPES = {"float32": "float", "float16": "float16_t", "bfloat16": "bfloat16_t", "uint32": "uint32_t",
            "int32": "int32_t", "int64": "int64_t", "uint16": "uint16_t", "uint8": "uint8_t"}
_STORE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "uint32": np.uint32,
          "int32": np.int32, "int64": np.int64, "uint16": np.uint16, "uint8": np.uint8}
# Attributes MLX adds to the signature when the body text contains their name, in MLX's order
# (mlx/backend/metal/custom_kernel.cpp, metal_kernel); None: not emulated by mlx_launch.h.
_MLX_ATTRS = {"dispatch_quadgroups_per_threadgroup": None, "dispatch_simdgroups_per_threadgroup": None,
              "dispatch_threads_per_threadgroup": None, "grid_origin": None, "grid_size": None,
              "quadgroup_index_in_threadgroup": None, "quadgroups_per_threadgroup": None,
              "simdgroup_index_in_threadgroup": "uint", "simdgroups_per_threadgroup": None,
              "thread_execution_width": None, "thread_index_in_quadgroup": None,
              "thread_index_in_simdgroup": "uint", "thread_index_in_threadgroup": "uint",
              "thread_position_in_grid": "uint3", "thread_position_in_threadgroup": "uint3",
              "threadgroup_position_in_grid": "uint3", "threadgroups_per_grid": None, "threads_per_grid": "uint3",
              "threads_per_simdgroup": None, "threads_per_threadgroup": None}
_MAX_CONSTANT = 8  # MLX passes inputs of fewer elements in the constant address space
_MAX_THREADGROUP = 1024  # Apple GPUs' maxTotalThreadsPerThreadgroup
_ENV = os.environ | {"ASAN_OPTIONS": "detect_leaks=0"}


# ---- one mx.fast.metal_kernel launch, on the host ---------------------------------------------------------

def _translation_unit(name: str, source: str, header: str, inputs: list, outputs: list, template: list) -> str:
    """C++ for one launch: the signature MLX writes for these inputs (name, dtype, size, ndim) and outputs
    (name, dtype), the template arguments as constants of a plain function (as driver.cpp: GCC files template
    statics outside the poisoned threadgroup section), the body verbatim, and a main() that runs the grid."""
    attrs = [a for a in _MLX_ATTRS if a in source]
    missing = [a for a in attrs if _MLX_ATTRS[a] is None]
    assert not missing, f"attributes not emulated by metal/shim/mlx_launch.h: {missing}"
    params, args = [], []
    for i, (n, dtype, size, ndim) in enumerate(inputs):
        space = "constant" if size < _MAX_CONSTANT else "device"
        params.append(f"const {space} {_C_TYPES[dtype]}{'&' if ndim == 0 else '*'} {n} [[buffer({i})]]")
        args.append(f"*in_{n}" if ndim == 0 else f"in_{n}")
        # The shim drops address spaces; Metal does not convert a constant pointer to a device one.
        assert space == "device" or not any(f"= {n}{c}" in source for c in " ;"), \
            f"{name}: {n} ({size} elements) is in the constant address space but initialises a pointer"
    params += [f"device {_C_TYPES[dtype]}* {n} [[buffer({len(inputs) + i})]]" for i, (n, dtype) in enumerate(outputs)]
    args += [f"out_{n}" for n, _ in outputs]
    params += [f"{_MLX_ATTRS[a]} {a} [[{a}]]" for a in attrs]
    args += [f"th.{a}" for a in attrs]
    consts = []
    for k, v in template:
        if isinstance(v, str):
            consts.append(f"using {k} = {_C_TYPES[v]};")
        else:
            consts.append(f"constexpr {'bool' if isinstance(v, bool) else 'int'} {k} = {str(v).lower()};")
    fn = f"[[kernel]] void custom_kernel_{name}(\n    " + ",\n    ".join(params) + ")"
    ptrs = [f"static const {_C_TYPES[dtype]}* in_{n};" for n, dtype, _, _ in inputs]
    ptrs += [f"static {_C_TYPES[dtype]}* out_{n};" for n, dtype in outputs]
    main = [f"  launch::start(argc, argv, {len(outputs)});"]
    main += [f'  in_{n} = static_cast<const {_C_TYPES[dtype]}*>(launch::input("{n}", sizeof(*in_{n})));'
             for n, dtype, _, _ in inputs]
    main += [f"  out_{n} = static_cast<{_C_TYPES[dtype]}*>(launch::output({i}, sizeof(*out_{n})));"
             for i, (n, dtype) in enumerate(outputs)]
    main += ["  launch::dispatch(run);"] + [f'  launch::save("{n}", {i});' for i, (n, _) in enumerate(outputs)]
    return "\n".join([
        f"// {name}: one mx.fast.metal_kernel launch, generated by tests/test_metal_sparse_host.py",
        '#include "mlx_launch.h"', header, "namespace kernel {", *consts, fn + ";", "}  // namespace kernel", *ptrs,
        "static void run(const launch::Thread& th) {", f"  kernel::custom_kernel_{name}({', '.join(args)});", "}",
        "int main(int argc, char** argv) {", *main, "  return 0;", "}",
        "namespace kernel {", fn + " {", f'#line 1 "{name}.metal"', source, "}", "}  // namespace kernel", ""])


class Builder:
    """Compiles translation units (cached by text, several at once) with g++, ASan and UBSan, linked with the
    launch runtime metal/shim/mlx_launch.cpp (compiled once)."""

    FLAGS = ("-std=c++17", "-O1", "-Wall", "-Werror", "-Wno-attributes", "-fsanitize=address,undefined",
             "-fno-sanitize-recover=all", f"-I{SHIM}")

    def __init__(self, out: Path):
        self.out, self.exes = out, {}
        self.runtime = out / "mlx_launch.o"
        r = subprocess.run([GXX, *self.FLAGS, "-c", str(SHIM / "mlx_launch.cpp"), "-o", str(self.runtime)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-4000:]

    def build(self, *texts: str) -> list[Path]:
        keys = [hashlib.sha256(t.encode()).hexdigest()[:16] for t in texts]
        procs = {}
        for key, text in zip(keys, texts):
            if key in self.exes or key in procs:
                continue
            src = self.out / f"k{key}.cpp"
            src.write_text(text)
            cmd = [GXX, *self.FLAGS, str(src), str(self.runtime), "-o", str(src.with_suffix(""))]
            procs[key] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for key, p in procs.items():
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, f"{self.out}/k{key}.cpp does not compile:\n{err[-4000:]}"
            self.exes[key] = self.out / f"k{key}"
        return [self.exes[k] for k in keys]


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
    out = tmp_path_factory.mktemp("sparse_kernels")
    probe = subprocess.run([GXX, *Builder.FLAGS, "-x", "c++", "-", "-o", str(out / "probe")], input="int main() {}",
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"g++ cannot build with -fsanitize=address,undefined: {probe.stderr.strip()[-300:]}")
    return Builder(out)


def _launch(builder: Builder, root: Path, name: str, source: str, inputs: list, outputs: list, template: list,
            grid: int, group: int, header: str = "", orders=ORDERS) -> list[np.ndarray]:
    """Run one launch (inputs: (name, dtype, array in its storage type); outputs: (name, dtype, shape)) in each
    thread order; the outputs must not depend on the order. Returns them in their storage type."""
    (exe,) = builder.build(_translation_unit(name, source, header, [(n, dt, a.size, a.ndim) for n, dt, a in inputs],
                                             [(n, dt) for n, dt, _ in outputs], template))
    data = Path(tempfile.mkdtemp(prefix=f"{name}_", dir=root))
    for n, dt, a in inputs:
        assert a.dtype == _STORE[dt], (n, a.dtype, dt)
        np.ascontiguousarray(a).tofile(data / f"{n}.bin")
    sizes = [str(int(np.prod(shape))) for _, _, shape in outputs]
    first = None
    for order in orders:
        r = subprocess.run([str(exe), str(data), str(order), str(grid), str(group), *sizes], capture_output=True,
                           text=True, timeout=120, env=_ENV)
        if r.returncode != 0:
            lines = [s for s in r.stderr.splitlines() if "doesn't fully support makecontext" not in s]
            at = next((i for i, s in enumerate(lines) if "ERROR" in s or "shim:" in s or "runtime error" in s), 0)
            raise AssertionError(f"{name} run failed (order {order}, rc {r.returncode}):\n"
                                 + "\n".join(lines[at:at + 8])[-3000:])
        got = [np.fromfile(data / f"{n}.bin", _STORE[dt]).reshape(shape) for n, dt, shape in outputs]
        first = got if first is None else first
        for a, b in zip(got, first):
            np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8), err_msg=f"{name}: order {order}")
    return first


# ---- cases and the numpy reference -----------------------------------------------------------------------

def _rounded(a: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """a -> (its T_in storage, the exact float64 values the kernel reads)."""
    a32 = np.asarray(a, np.float32)
    if dtype == "float32":
        return a32, a32.astype(np.float64)
    if dtype == "float16":
        s = a32.astype(np.float16)
        return s, s.astype(np.float64)
    bits = f32_to_bf16(a32)
    return bits, bf16_to_f32(bits).astype(np.float64)


def _case(seed: int, dtype: str, t: int, k: int, n: int, d: int) -> dict:
    """Random x, bundled, c, y0 in T_in and duplicate-free idx rows in random order. Token 0 keeps the last
    neuron (a row off by one reads past the buffer) and, with K >= 3, neurons 0 and 1, whose gate rows make
    their gate value +-120 for it (silu saturates; exp(120) overflows float32)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, d))
    b = rng.standard_normal((n, 3, d)) / np.sqrt(d)
    lead = [n - 1, 0, 1] if k >= 3 else [n - 1]
    if k >= 3:
        b[0, 0], b[1, 0] = 120 * x[0] / (x[0] @ x[0]), -120 * x[0] / (x[0] @ x[0])
        b[:2, 2] /= 100
    idx = np.stack([rng.permutation(n)[:k] for _ in range(t)]).astype(np.uint32)
    idx[0] = lead + [j for j in rng.permutation(n) if j not in lead][:k - len(lead)]
    case = {"dtype": dtype, "idx": idx}
    for name, v in (("x", x), ("bundled", b), ("c", rng.standard_normal(n) * 0.5),
                    ("y0", rng.standard_normal(d) * 0.5)):
        case[name], case[name + "64"] = _rounded(v, dtype)
    return case


def _reference(case: dict, h: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """float64: h [T, K] = silu(G x) * (U x) - c over each token's kept rows, y [T, D] = y0 + h @ their down
    columns; with h given, y uses it (sparse_down alone)."""
    w = case["bundled64"][case["idx"]]  # [T, K, 3, D]
    g = np.einsum("tkd,td->tk", w[:, :, 0], case["x64"])
    u = np.einsum("tkd,td->tk", w[:, :, 1], case["x64"])
    with np.errstate(over="ignore"):
        href = g / (1 + np.exp(-g)) * u - case["c64"][case["idx"]]
    hy = href if h is None else h.astype(np.float64)
    return href, case["y064"] + np.einsum("tk,tkd->td", hy, w[:, :, 2])


def _close(got, want, tol, msg="", scale=1.0):
    np.testing.assert_allclose(got, want, rtol=tol.rtol, atol=tol.atol * scale, err_msg=msg)


def _body(name: str) -> str:
    return (ROOT / "metal" / f"{name}.metal").read_text()


def _check_hidden(builder, root, case, source=None, groups=(32 * SIMDGROUPS, 32), orders=ORDERS) -> np.ndarray:
    """sparse_hidden over its real grid (32 threads per kept neuron), with metal_step's threadgroup and with
    one simdgroup per threadgroup: h [T, K] float32 against float64 numpy within KERNEL["float32"] (it reads
    T_in and computes in float32; the reference reads the same rounded values)."""
    dt, (t, d), k = case["dtype"], case["x"].shape, case["idx"].shape[1]
    want, _ = _reference(case)
    for group in groups:
        (h,) = _launch(builder, root, "sparse_hidden", source or _body("sparse_hidden"),
                       [("x", dt, case["x"]), ("bundled", dt, case["bundled"]), ("idx", "uint32", case["idx"]),
                        ("c", dt, case["c"])], [("h", "float32", (t, k))],
                       [("T_in", dt), ("D", d), ("K", k)], 32 * t * k, group, orders=orders)
        _close(h, want, KERNEL["float32"], f"sparse_hidden {dt}, threadgroup {group}")
    return h


def _check_down(builder, root, case, h: np.ndarray, source=None, orders=ORDERS) -> np.ndarray:
    """sparse_down over its real grid (one thread per output element, threadgroup min(256, D)): y [T, D]
    float32 against y0 + h @ down in float64 within KERNEL["float32"]."""
    dt, (t, d), k = case["dtype"], case["x"].shape, case["idx"].shape[1]
    _, want = _reference(case, h)
    (y,) = _launch(builder, root, "sparse_down", source or _body("sparse_down"),
                   [("h", "float32", h), ("bundled", dt, case["bundled"]), ("idx", "uint32", case["idx"]),
                    ("y0", dt, case["y0"])], [("y", "float32", (t, d))],
                   [("T_in", dt), ("D", d), ("K", k)], t * d, min(256, d), orders=orders)
    _close(y, want, KERNEL["float32"], f"sparse_down {dt}")
    return y


def _prebuild(builder, dtype, t, k, n, d):
    """Compile a case's two bodies at once (2 cores); _launch then finds them built."""
    sizes = {"x": t * d, "bundled": n * 3 * d, "idx": t * k, "c": n, "h": t * k, "y0": d}
    dts = {"idx": "uint32", "h": "float32"}
    tus = [_translation_unit(name, _body(name), "", [(a, dts.get(a, dtype), sizes[a], 1 if a in ("c", "y0") else 2)
                                                    for a in names], [(out, "float32")],
                             [("T_in", dtype), ("D", d), ("K", k)])
           for name, names, out in (("sparse_hidden", HIDDEN_IN, "h"), ("sparse_down", DOWN_IN, "y"))]
    builder.build(*tus)


# (T, K, N, D): D % 32 != 0 and a short last threadgroup (15 neurons: 3 x 128 + 96 threads); K = 1 with T = 1
# and D = 32 (grid smaller than the threadgroup; idx and h in the constant address space); D < 32 (idle lanes)
# over 16 threadgroups; D > 256 (sparse_down threadgroups of 256, the last one of 2 threads), D % 32 == 1.
SHAPES = [(3, 5, 40, 70), (1, 1, 9, 32), (4, 16, 64, 20), (2, 7, 300, 257)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-K{}-N{}-D{}".format(*s))
def test_host_sparse_kernels_match_numpy(builder, tmp_path, dtype, shape):
    _prebuild(builder, dtype, *shape)
    case = _case(sum(shape), dtype, *shape)
    h = _check_hidden(builder, tmp_path, case)
    _check_down(builder, tmp_path, case, h)  # fed the kernel's own h, as metal_step chains them


@settings(max_examples=12, deadline=None)
@given(dtype=st.sampled_from(DTYPES), t=st.integers(2, 9), n=st.integers(8, 150), seed=st.integers(0, 2**32 - 1),
       order=st.sampled_from(ORDERS))
def test_host_sparse_kernels_fuzzed(builder, tmp_path_factory, dtype, t, n, seed, order):
    """Random token counts, neuron counts and routes on the first shape's builds (D = 70, K = 5; T >= 2 and
    N >= 8 keep every buffer in the device address space, so no new build)."""
    case = _case(seed, dtype, t, 5, n, 70)
    root = tmp_path_factory.mktemp("fuzz")
    h = _check_hidden(builder, root, case, groups=(32 * SIMDGROUPS,), orders=(order,))
    _check_down(builder, root, case, h, orders=(order,))


# ---- the check can fail: mutated bodies must be caught by the same comparison ----------------------------

MUTANTS = {
    "hidden-row-stride": ("sparse_hidden", "(ulong)row * 3 * D", "(ulong)row * 2 * D", None),
    "hidden-no-prior": ("sparse_hidden", " - float(c[row])", "", None),
    "hidden-no-simd-sum": ("sparse_hidden", "sg = simd_sum(sg);", "", None),  # lane 0's partial dot only
    "hidden-drops-tail": ("sparse_hidden", "i < D;", "i + 32 <= D;", None),  # the D % 32 last columns
    "hidden-token-from-k": ("sparse_hidden", "uint t = job / K;", "uint t = job % K;", None),
    "hidden-divergent-simd-sum": ("sparse_hidden", "sg = simd_sum(sg);", "if (lane < 16) sg = simd_sum(sg);",
                                  "simd_sum reached at different lines"),
    "hidden-row-past-end": ("sparse_hidden", "(ulong)row * 3 * D", "(ulong)(row + 1) * 3 * D",
                            "heap-buffer-overflow"),
    "down-up-row": ("sparse_down", "* 3 + 2) * D", "* 3 + 1) * D", None),
    "down-no-y0": ("sparse_down", "float acc = float(y0[i]);", "float acc = 0.0f;", None),
    "down-token-0-idx": ("sparse_down", "idx[t * K + j]", "idx[j]", None),
    "down-last-column-unwritten": ("sparse_down", "y[gid] = acc;", "if (i + 1 < D) y[gid] = acc;", "nan"),
}


@pytest.mark.parametrize("mutant", MUTANTS)
def test_host_check_catches_mutant(builder, tmp_path, mutant):
    kernel, old, new, message = MUTANTS[mutant]
    body = _body(kernel)
    assert body.count(old) == 1, f"mutation target {old!r} not (once) in {kernel}.metal"
    case = _case(1, "bfloat16", 3, 5, 40, 70)
    with pytest.raises(AssertionError) as err:
        if kernel == "sparse_hidden":
            _check_hidden(builder, tmp_path, case, body.replace(old, new))
        else:
            _check_down(builder, tmp_path, case, _reference(case)[0].astype(np.float32), body.replace(old, new))
    if message:
        assert message in str(err.value)


def test_launcher_models_constant_address_space():
    """MLX passes inputs under 8 elements as `const constant T*`, which Metal will not turn into the `const
    device T*` locals sparse_hidden declares: a launch with T * D < 8 would not compile there, nor here."""
    inputs = [("x", "float32", 4, 2), ("bundled", "float32", 12, 3), ("idx", "uint32", 1, 2), ("c", "float32", 1, 1)]
    with pytest.raises(AssertionError, match="x .4 elements. is in the constant address space"):
        _translation_unit("sparse_hidden", _body("sparse_hidden"), "", inputs, [("h", "float32")],
                          [("T_in", "float32"), ("D", 4), ("K", 1)])


# ---- dn_mlx.kernels' Metal path, with mx.fast.metal_kernel run by the host ----------------------------------

@pytest.fixture
def host_metal(builder, tmp_path, monkeypatch):
    """Replace mx.fast.metal_kernel by the host launcher and make dn_mlx believe it runs on Metal: the
    source, names, input dtypes, template arguments, grid, threadgroup and output shapes the Python code
    passes are the ones compiled and run, so a mismatch with the body fails to compile or gives wrong results."""
    mx = pytest.importorskip("mlx.core")
    from dn_mlx import kernels as mlx_kernels
    from dn_mlx import ops as mlx_ops

    dtypes = {getattr(mx, n): n for n in _C_TYPES}
    calls = []

    def storage(a):
        assert a.dtype in dtypes, f"input dtype {a.dtype} not emulated"
        dt = dtypes[a.dtype]
        return dt, np.array(a.view(mx.uint16) if dt == "bfloat16" else a)

    def metal_kernel(name, input_names, output_names, source, header="", ensure_row_contiguous=True,
                     atomic_outputs=False):
        assert name.startswith("dn_") and ensure_row_contiguous and not atomic_outputs
        kernel = name.removeprefix("dn_")
        assert source == _body(kernel), f"{kernel}: the launched source is not metal/{kernel}.metal"

        def launch(*, inputs, output_shapes, output_dtypes, grid, threadgroup, template=(), init_value=None,
                   verbose=False, stream=None):
            assert len(inputs) == len(input_names) and len(output_shapes) == len(output_dtypes) == len(output_names)
            assert init_value is None
            assert all(type(v) is int for v in (*grid, *threadgroup)), (grid, threadgroup)
            assert grid[1:] == (1, 1) and threadgroup[1:] == (1, 1), "the host launcher runs 1-D grids"
            assert 0 < threadgroup[0] <= _MAX_THREADGROUP and grid[0] > 0, (grid, threadgroup)
            tmpl = [(k, dtypes[v] if isinstance(v, mx.Dtype) else v) for k, v in template]
            assert all(isinstance(v, str) or type(v) in (int, bool) for _, v in tmpl), tmpl
            ins = [(n, *storage(a)) for n, a in zip(input_names, inputs)]
            outs = [(n, dtypes[dt], tuple(s)) for n, dt, s in zip(output_names, output_dtypes, output_shapes)]
            got = _launch(builder, tmp_path, kernel, source, ins, outs, tmpl, grid[0], threadgroup[0], header)
            calls.append({"kernel": kernel, "inputs": tuple(input_names), "outputs": tuple(output_names),
                          "template": dict(tmpl), "grid": grid, "threadgroup": threadgroup})
            return [mx.array(a).view(mx.bfloat16) if dt == "bfloat16" else mx.array(a)
                    for a, (_, dt, _) in zip(got, outs)]

        return launch

    mlx_kernels._kernel.cache_clear()
    monkeypatch.setattr(mx.fast, "metal_kernel", metal_kernel)
    monkeypatch.setattr(mlx_ops, "fused_available", lambda x, act="silu": True)
    yield mlx_kernels, calls
    mlx_kernels._kernel.cache_clear()


def _metal_step_matches(step, dtype: str):
    """step(x, bundled, idx, c, y0) on the first shape (its builds are reused) against numpy; y in x's dtype
    within KERNEL[dtype] (float32 in the kernels, then the cast)."""
    import mlx.core as mx

    t, k, n, d = SHAPES[0]
    case = _case(7, dtype, t, k, n, d)
    arr = {name: mx.array(case[name + "64"].astype(np.float32)).astype(getattr(mx, dtype))
           for name in ("x", "bundled", "c", "y0")}
    y = step(arr["x"], arr["bundled"], mx.array(case["idx"].astype(np.int32)), arr["c"], arr["y0"])
    assert y.dtype == getattr(mx, dtype) and y.shape == (t, d)
    _close(np.array(y.astype(mx.float32)), _reference(case)[1], KERNEL[dtype])
    return case


@pytest.mark.parametrize("dtype", DTYPES)
def test_metal_step_through_host_kernels(host_metal, dtype):
    mlx_kernels, calls = host_metal
    case = _metal_step_matches(mlx_kernels.metal_step, dtype)  # int32 idx: metal_step casts it
    (t, d), k = case["x"].shape, case["idx"].shape[1]
    tmpl = {"T_in": dtype, "D": d, "K": k}
    assert calls == [
        {"kernel": "sparse_hidden", "inputs": HIDDEN_IN, "outputs": ("h",), "template": tmpl,
         "grid": (32 * t * k, 1, 1), "threadgroup": (32 * SIMDGROUPS, 1, 1)},
        {"kernel": "sparse_down", "inputs": DOWN_IN, "outputs": ("y",), "template": tmpl,
         "grid": (t * d, 1, 1), "threadgroup": (min(256, d), 1, 1)}]


GLUE_MUTANTS = {
    "x-not-cast": ("inputs=[x.astype(bundled.dtype), bundled", "inputs=[x.astype(mx.float32), bundled",
                   "does not compile"),
    "grid-one-thread-per-neuron": ("grid=(32 * t * k, 1, 1)", "grid=(t * k, 1, 1)", None),
    "threadgroup-splits-simdgroups": ("threadgroup=(32 * simdgroups, 1, 1)", "threadgroup=(48, 1, 1)", None),
    "down-input-names-swapped": ('("h", "bundled", "idx", "y0")', '("bundled", "h", "idx", "y0")',
                                 "heap-buffer-overflow"),
}


@pytest.mark.parametrize("mutant", GLUE_MUTANTS)
def test_host_launch_catches_glue_mutant(host_metal, mutant):
    """metal_step with one launch argument wrong (exec'd from its mutated source) fails the same check."""
    mlx_kernels, _ = host_metal
    old, new, message = GLUE_MUTANTS[mutant]
    src = inspect.getsource(mlx_kernels.metal_step)
    assert src.count(old) == 1, f"mutation target {old!r} not (once) in metal_step"
    namespace = dict(vars(mlx_kernels))
    exec(compile(src.replace(old, new), f"<{mutant}>", "exec"), namespace)
    with pytest.raises(AssertionError) as err:
        _metal_step_matches(namespace["metal_step"], "bfloat16")
    if message:
        assert message in str(err.value)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sparse_mlp_metal_path_through_host_kernels(host_metal, dtype):
    """SparseMLP end to end on the Metal path ('auto' picks it on Metal with top-k): router -> host-side
    indices -> the two launches; against dn.formats.sparse's reference on the same rounded weights and routes, and
    against the MLX gather path (scaled tolerance, as tests/test_sparse.py)."""
    from dn.formats import sparse
    from dn.runtime import sparse_mlp
    from dn_mlx import sparse as mlx_sparse

    _, calls = host_metal
    t, k, n, d = SHAPES[0]
    rng = np.random.default_rng(5)
    g, u, dn = (rng.standard_normal(s).astype(np.float32) * 0.2 for s in ((n, d), (n, d), (d, n)))
    layer = sparse.fit_layer(rng.standard_normal((200, d)).astype(np.float32), g, u, dn, k, 8, "median",
                             "lowrank", "topk")
    mlp = mlx_sparse.make_sparse_mlp(sparse.bundle(g, u, dn), layer, dtype)
    x = rng.standard_normal((t, d)).astype(np.float32)
    bq = sparse.bundle(g, u, dn)
    if dtype == "bfloat16":  # the reference sees the same rounded weights, inputs and prior
        bq, x = bf16_to_f32(f32_to_bf16(bq)), bf16_to_f32(f32_to_bf16(x))
        layer.prior_c = bf16_to_f32(f32_to_bf16(layer.prior_c))
        layer.prior_y0 = bf16_to_f32(f32_to_bf16(layer.prior_y0))
    for xs in (x, x[:1]):  # a prompt and a decode step
        calls.clear()
        mask = sparse_mlp.route(xs, mlp)
        want = sparse.sparse_mlp_step(xs, bq, layer, mask)
        got = sparse_mlp.step(xs, mlp, "auto")
        assert [c["kernel"] for c in calls] == ["sparse_hidden", "sparse_down"]
        scale = float(np.abs(want).max())
        _close(got, want, KERNEL[dtype], "metal path vs reference", scale)
        _close(got, sparse_mlp.step(xs, mlp, "gather"), KERNEL[dtype], "metal vs gather path", scale)
