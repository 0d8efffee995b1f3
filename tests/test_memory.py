"""dn.memory: what a load holds, measured by the platform, against what dn footprint accounts for it."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from dn import memory

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
    base = memory.snapshot()["rss"]
    block = np.ones(64 * MiB // 8)  # touched: 64 MiB resident
    del block
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
    """dn.loader.load of the default model, measured: plain, then holding a forgotten copy of the MLP weights
    (backend arrays, then numpy). Every model stays alive, so no load reuses memory another one freed."""
    from dn import backend as backends
    from dn import loader

    be, held, out = backends.get(backend_name), [], {}
    plain = be.load
    out["plain"] = loader.load(None, backend_name, "float32")
    for as_numpy in (False, True):
        be.load = lambda *args, as_numpy=as_numpy: _holding(plain(*args), held, as_numpy)
        out["numpy" if as_numpy else "backend-arrays"] = loader.load(None, backend_name, "float32")
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


@pytest.mark.slow
def test_load_peak_is_bounded(loads, backend_name, default_model_dir, default_spec):
    from dn.spec import weight_files

    m, spec, acc = loads(backend_name)["plain"], default_spec, _accounted(default_spec)
    layer = max(sum(t.numel for t in spec.layer_tensors(i)) * 4 for i in range(spec.architecture.num_hidden_layers))
    checkpoint = sum(f.stat().st_size for f in weight_files(default_model_dir))
    # Target: accounted + one layer + PROCESS_MARGIN, a load that converts layer by layer. Both backends miss
    # it by about the checkpoint (bf16, 256.6 MiB): torch pages in the whole safetensors mmap during
    # from_pretrained (peak 779.5 MiB), MLX's mx.load holds every bf16 array beside its float32 copy until
    # set_dtype is done (769.70 MiB = accounted + checkpoint, to the byte). This bound holds today:
    assert m["measured_resident_bytes"] <= m["load_peak_bytes"] <= acc + checkpoint + layer + PROCESS_MARGIN, m


if __name__ == "__main__":  # the fresh process of the `loads` fixture
    print(json.dumps(measured_loads(sys.argv[1])))
