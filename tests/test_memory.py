"""dn.runtime.memory: what a load holds, measured by the platform, against what dn footprint accounts for it."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from dn.runtime import memory

MiB = 2**20
# Margins of measured against accounted bytes, from the default model in float32 (accounted 513.13 MiB):
# - a device allocator counts live arrays only: MLX's CPU build measures 513.13 MiB, to the byte; Metal pads
#   buffers over a page to 16 KiB pages (at most 4.3 MiB over the model's 273 arrays).
# - the process RSS adds what the first load of a process touches besides weights: torch +12 MiB (8.2 MiB of
#   libtorch code paged in, ~4 MiB of module objects and thread stacks), MLX +4.5 MiB.
# Twice that still fails a forgotten copy of the MLP weights (303.75 MiB), the embeddings (108 MiB) or of the
# MLPs of three layers (30.4 MiB).
ALLOCATOR_MARGIN = 8 * MiB
PROCESS_MARGIN = 24 * MiB

SMAPS_ROLLUP = """55b87367d000-7ffdd0b17000 ---p 00000000 00:00 0                          [rollup]
Rss:                1744 kB
Pss:                 445 kB
Pss_Anon:            112 kB
Pss_File:            333 kB
Shared_Clean:       1596 kB
Private_Dirty:       112 kB
Anonymous:           112 kB
Swap:                  0 kB
"""
STATUS = """Name:\tcat
VmHWM:\t    2176 kB
VmRSS:\t    1744 kB
RssAnon:\t     112 kB
RssFile:\t    1600 kB
RssShmem:\t      32 kB
Threads:\t1
"""


def test_parse_kib_reads_kb_fields_and_skips_the_rest():
    fields = memory.parse_kib(SMAPS_ROLLUP)
    assert fields["Rss"] == 1744 * 1024 and fields["Pss"] == 445 * 1024 and fields["Anonymous"] == 112 * 1024
    assert len(fields) == 8  # the [rollup] header, whose address range holds a colon, is not a field
    assert memory.parse_kib(STATUS) == {"VmHWM": 2176 * 1024, "VmRSS": 1744 * 1024, "RssAnon": 112 * 1024,
                                        "RssFile": 1600 * 1024, "RssShmem": 32 * 1024}


@pytest.fixture
def proc(tmp_path, monkeypatch):
    """A fake /proc/self holding the captured samples."""
    (tmp_path / "smaps_rollup").write_text(SMAPS_ROLLUP)
    (tmp_path / "status").write_text(STATUS)
    (tmp_path / "clear_refs").mkdir()  # writing it fails, as where clear_refs is refused
    monkeypatch.setattr(memory, "_PROC", tmp_path)
    yield tmp_path
    monkeypatch.undo()
    memory.reset_peak()  # on the real /proc again: stops a sampler the test started


def test_snapshot_splits_file_backed_from_anonymous(proc):
    assert memory.snapshot() == {"kind": "process rss (smaps_rollup)", "rss": 1744 * 1024, "pss": 445 * 1024,
                                 "anon": 112 * 1024, "file": (1744 - 112 - 32) * 1024}


def test_snapshot_falls_back_to_status_then_getrusage(proc):
    (proc / "smaps_rollup").unlink()
    assert memory.snapshot() == {"kind": "process rss (status)", "rss": 1744 * 1024, "pss": None,
                                 "anon": 112 * 1024, "file": 1600 * 1024}
    (proc / "status").unlink()
    s = memory.snapshot()
    assert s["kind"] == "max rss since start (getrusage)" and s["rss"] > 10 * MiB and s["anon"] is None


def test_peak_is_sampled_where_clear_refs_is_refused(proc):
    assert memory.reset_peak().startswith("rss sampled")
    (proc / "smaps_rollup").write_text(SMAPS_ROLLUP.replace("1744 kB", "9000 kB"))
    time.sleep(0.5)  # 100 polls
    (proc / "smaps_rollup").write_text(SMAPS_ROLLUP)
    time.sleep(0.1)
    assert memory.peak() == 9000 * 1024


def test_peak_resets_through_clear_refs():
    if not memory.reset_peak().startswith("VmHWM"):
        pytest.skip("clear_refs cannot be written here")
    import mmap

    base = memory.snapshot()["rss"]
    block = mmap.mmap(-1, 64 * MiB)  # fresh pages (freed heap a long test run holds would not raise RSS)
    for i in range(0, 64 * MiB, 4096):
        block[i] = 1  # touched: 64 MiB resident
    block.close()
    assert memory.peak() - base >= 60 * MiB
    memory.reset_peak()
    assert memory.peak() - base < 8 * MiB


def off_by(m: dict, accounted: int) -> dict:
    """How far the measured figure and the process's figure lie from the accounted bytes, and the margins."""
    margin = PROCESS_MARGIN if m["measured_kind"] == m["rss_kind"] else ALLOCATOR_MARGIN
    return {"measured": (m["measured_resident_bytes"] - accounted, margin),
            "process": (m["rss_bytes"] - accounted, PROCESS_MARGIN)}


def matches_accounted(m: dict, accounted: int) -> bool:
    # Both figures: on MLX the allocator misses numpy copies, the process misses nothing.
    return all(abs(diff) <= margin for diff, margin in off_by(m, accounted).values())


def _copy_mlp(model, as_numpy: bool) -> list:
    """A dense copy of every MLP weight, in the backend's arrays or in numpy."""
    ws = [getattr(layer.mlp, n).weight for layer in model.model.layers for n in ("gate_proj", "up_proj", "down_proj")]
    if hasattr(ws[0], "detach"):  # torch
        return [w.detach().numpy().copy() if as_numpy else w.detach().clone() for w in ws]
    if as_numpy:
        return [np.array(w) for w in ws]
    import mlx.core as mx

    copies = [w * 1 for w in ws]
    mx.eval(copies)
    return copies


def measured_loads(backend_name: str) -> dict:
    """dn.runtime.loader.load of the default model, measured: plain, then holding a forgotten copy of the MLP weights
    (backend arrays, then numpy). Every model stays alive, so no load reuses memory another one freed."""
    from dn.runtime import backend as backends
    from dn.runtime import loader

    be, held, out = backends.get(backend_name), [], {}
    plain = be.load
    out["plain"] = loader.load(None, backend_name, "float32", dense=True)  # the widening: its MLPs are dense
    for as_numpy in (False, True):
        be.load = lambda *args, as_numpy=as_numpy: _holding(plain(*args), held, as_numpy)
        out["numpy" if as_numpy else "backend-arrays"] = loader.load(None, backend_name, "float32", dense=True)
    be.load = plain
    return {"copy_bytes": sum(w.nbytes for w in held[0]), **{k: run.memory for k, run in out.items()}}


def _holding(model, held: list, as_numpy: bool):
    held.append(_copy_mlp(model, as_numpy))
    return model


@pytest.fixture(scope="module")
def loads():
    """measured_loads per backend, each in a fresh process: in a process that has freed memory (other tests), a
    load reuses pages glibc retained (the tops of per-thread arenas, which malloc_trim leaves) and its RSS
    delta undercounts, by up to 90 MiB seen here."""
    cache = {}

    def get(name):
        if name not in cache:
            proc = subprocess.run([sys.executable, __file__, name], capture_output=True, text=True, timeout=900)
            assert proc.returncode == 0, proc.stderr
            cache[name] = json.loads(proc.stdout.splitlines()[-1])
        return cache[name]

    return get


def _accounted(spec) -> int:
    from dn.footprint import accounted

    return accounted(spec, "float32", 0)["resident_weight_bytes"]


@pytest.mark.slow
def test_measured_resident_bytes_match_the_accounted(loads, backend_name, default_spec):
    m, acc = loads(backend_name)["plain"], _accounted(default_spec)
    assert matches_accounted(m, acc), off_by(m, acc)


@pytest.mark.slow
@pytest.mark.parametrize("copy", ["backend-arrays", "numpy"])
def test_a_forgotten_dense_copy_fails_the_check(loads, backend_name, default_spec, copy):
    r, acc = loads(backend_name), _accounted(default_spec)
    assert r["copy_bytes"] == 303.75 * MiB
    assert not matches_accounted(r[copy], acc)
    assert r[copy]["rss_bytes"] - acc > r["copy_bytes"] - PROCESS_MARGIN  # the copy is what the process shows


def layer_bytes(spec, dtype_bytes: int = 4) -> int:
    """The largest decoder layer's weights, dense at the compute dtype: what a load may hold beside the model."""
    return max(sum(t.numel for t in spec.layer_tensors(i)) for i in range(spec.architecture.num_hidden_layers)) \
        * dtype_bytes


def peak_over(m: dict, accounted: int, layer: int) -> dict:
    """How far a load's peak lies above what it holds after it and above the accounted bytes, and the bound: one
    layer plus the margin of the figure that measured the peak (the device allocator's or the process's)."""
    margin = PROCESS_MARGIN if m["load_peak_kind"] == m["rss_peak_kind"] else ALLOCATOR_MARGIN
    peak = m["load_peak_bytes"]
    return {"over final": (peak - m["measured_resident_bytes"], layer + margin),
            "over accounted": (peak - accounted, layer + margin)}


def peak_is_bounded(m: dict, accounted: int, layer: int) -> bool:
    """A load goes straight into its final form: its peak is at most the final weights plus about one layer."""
    return all(over <= bound for over, bound in peak_over(m, accounted, layer).values())


@pytest.mark.slow
def test_load_peak_is_bounded(loads, backend_name, default_model_dir, default_spec):
    from dn.model.spec import weight_files

    m, acc, layer = loads(backend_name)["plain"], _accounted(default_spec), layer_bytes(default_spec)
    checkpoint = sum(f.stat().st_size for f in weight_files(default_model_dir))
    # Read tensor by tensor from plain file reads, a layer at a time, converted in chunks of rows: the peak is the
    # model plus at most one layer (13.5 MiB; measured 0.3 MiB over on torch, 0.2 on MLX). A whole bf16 checkpoint
    # beside the float32 model (256.6 MiB: from_pretrained's mmap, mx.load + set_dtype, as before) fails it.
    assert checkpoint > layer + PROCESS_MARGIN
    assert m["measured_resident_bytes"] <= m["load_peak_bytes"], m
    assert peak_is_bounded(m, acc, layer), peak_over(m, acc, layer)


# ---- every format's load, on a synthetic model whose detours would show --------------------------------------

# llama, 8 layers of 11.5 MiB in float32 and a 62.5 MiB embedding, stored bf16; the folders build in seconds. Big
# enough for a detour to show: the loaders that held a whole bf16 checkpoint, every layer's coded data, the bf16
# embedding or every dense MLP beside the model peaked 79 and 81 (dense, torch and MLX), 65 and 33 (lossless), 66
# and 100 MiB (sparse) over what they held after, against bounds of 35.5 (process) and 19.5 MiB (allocator).
SYN = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8,
       "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 32000}


def synthetic_model(path):
    """A random llama of SYN's sizes, bf16 safetensors written with dn.core.tensors."""
    from dn.core import tensors as safetensors_io
    from dn.model import spec

    cfg = SYN | {"model_type": "llama", "rms_norm_eps": 1e-6, "max_position_embeddings": 256,
                 "tie_word_embeddings": True, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    shapes = spec.tensor_shapes(spec.Architecture.from_hf_config(cfg), norms=True)
    rng = np.random.default_rng(0)
    weights = {name: (safetensors_io.f32_to_bf16(rng.standard_normal(shape, np.float32) * 0.05
                                                 + ("norm" in name)), "BF16") for name, shape in shapes.items()}
    path.mkdir()
    safetensors_io.save(weights, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def _sparse_folder(src, out):
    """src with a sparse section of random routers and priors (the default kinds: int4 router, sketch prior,
    threshold selection): what matters here is their bytes, not their fit."""
    from dn.formats import sparse
    from dn.model.spec import load_spec
    from dn.runtime.writer import copy_dense

    d, n, rng = SYN["hidden_size"], SYN["intermediate_size"], np.random.default_rng(1)

    def int4(rows, cols):
        return (rng.integers(0, 256, (rows, cols // 2), dtype=np.uint8),
                rng.random((rows, cols // sparse.GROUP), dtype=np.float32) + 0.5)

    layers = []
    for _ in range(SYN["num_hidden_layers"]):
        (ra, rb), (pa, pb) = int4(2 * n, d), int4(d, n)
        layers.append(sparse.LayerSparse(n // 2, ra, rb, np.zeros(n, np.float32), np.zeros(d, np.float32),
                                         "int4", "threshold", rng.random(n, dtype=np.float32), pa, pb))
    s = sparse.SparseSpec(0.5, d, n, router="int4", prior="sketch", select="threshold",
                          keep=[n // 2] * len(layers), layers=layers)
    out.mkdir()
    copy_dense(src, out)
    spec = load_spec(src)
    spec.sparse = sparse.save(s, out)
    spec.save(out)
    return out


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """fmt -> a folder of the synthetic model in that format."""
    from dn.runtime.writer import convert

    root = tmp_path_factory.mktemp("synthetic")
    dense = synthetic_model(root / "dense")
    convert(dense, root / "lossless", "lossless", None)
    return {"dense": dense, "lossless": root / "lossless", "sparse": _sparse_folder(dense, root / "sparse")}


def measured_folder(backend_name: str, model_dir: str) -> dict:
    """dn.runtime.memory.measure_load of one folder in float32."""
    from pathlib import Path

    from dn.model.spec import load_spec
    from dn.runtime import backend as backends

    return memory.measure_load(backends.get(backend_name), Path(model_dir), load_spec(Path(model_dir)), "float32")[1]


@pytest.mark.slow  # ~20 s: six fresh processes
@pytest.mark.parametrize("fmt", ["dense", "lossless", "sparse"])
def test_every_format_loads_without_a_detour(synthetic, backend_name, fmt):
    from dn.model.spec import load_spec

    spec = load_spec(synthetic[fmt])
    proc = subprocess.run([sys.executable, __file__, backend_name, str(synthetic[fmt])], capture_output=True,
                          text=True, timeout=300)  # a fresh process, as the `loads` fixture says why
    assert proc.returncode == 0, proc.stderr
    m, acc, layer = json.loads(proc.stdout.splitlines()[-1]), _accounted(spec), layer_bytes(spec)
    assert peak_is_bounded(m, acc, layer), peak_over(m, acc, layer)


if __name__ == "__main__":  # the fresh process of the `loads` fixture and of test_every_format_loads_without_a_detour
    print(json.dumps(measured_loads(sys.argv[1]) if len(sys.argv) == 2 else measured_folder(*sys.argv[1:3])))
