"""One tensor path and the format objects.

A backend's load reads each stored file once (dense, affine, lossless and sparse folders, on both backends):
dn.core.tensors.File is the one reader (each file opened once, each stored tensor read once, converted there a chunk
of rows at a time); a second path (mx.load, a header read again, a tensor read twice) shows as a second open or more
bytes read. Not counted here: dn.runtime.loader.load first checks every file's header (tensors.check_folder), one
more open and header read per file before the backend's load. The weight formats share one small interface
(dn/formats/__init__.py): their numpy paths agree with each other."""

import shutil

import numpy as np
import pytest
from test_families import tiny_model

from dn import formats
from dn.core import tensors
from dn.formats import fixed4, planes, quant, sparse
from dn.model.spec import load_spec
from dn.runtime.writer import convert


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("path")
    dense = tiny_model(root / "dense", "llama")
    convert(dense, root / "affine", None, None, quant={"bits": 4, "group_size": 32})
    convert(dense, root / "lossless", "lossless", None)
    _sparse_folder(dense, root / "sparse")
    return root


def _sparse_folder(dense, out):
    """dense plus a sparse spec fitted on random inputs (routers and priors in sparse.FILE)."""
    shutil.copytree(dense, out)
    spec, rng = load_spec(dense), np.random.default_rng(0)
    with tensors.File(dense / "model.safetensors") as f:
        mlp = [[tensors.bf16_to_f32(f.read(f"model.layers.{i}.mlp.{p}_proj.weight")) for p in ("gate", "up", "down")]
               for i in range(spec.architecture.num_hidden_layers)]
    x = rng.standard_normal((256, spec.architecture.hidden_size)).astype(np.float32)
    fitted = [sparse.fit_layer(x, *w, 48, 16, "median", "int4") for w in mlp]
    spec.sparse = sparse.save(sparse.SparseSpec(0.5, spec.architecture.hidden_size,
                                                spec.architecture.intermediate_size, router="int4", rank=16,
                                                prior="median", keep=[48] * len(fitted), layers=fitted), out)
    spec.save(out)


@pytest.mark.parametrize("fmt", ["dense", "affine", "lossless", "sparse"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loading_reads_each_stored_file_once(backend, folders, monkeypatch, fmt, dtype):
    folder = folders / fmt
    spec = load_spec(folder)
    opened, read = {}, {}
    real_open, real_rows = tensors._open, tensors.File._rows

    def counted_open(path):
        opened[path.name] = opened.get(path.name, 0) + 1
        return real_open(path)

    def counted_rows(self, name, r0=0, r1=None):
        a = real_rows(self, name, r0, r1)
        read[self.path.name, name] = read.get((self.path.name, name), 0) + a.nbytes
        return a

    monkeypatch.setattr(tensors, "_open", counted_open)
    monkeypatch.setattr(tensors.File, "_rows", counted_rows)
    if backend.NAME == "mlx":
        import mlx.core as mx

        monkeypatch.setattr(mx, "load", lambda *a, **k: pytest.fail("mx.load reads a file beside dn.core.tensors"))
    backend.load(folder, spec, dtype)
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    assert opened == dict.fromkeys(files, 1)
    stored = {}
    for name in files:
        header, _ = tensors.read_header(folder / name)
        stored |= {(name, k): v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()}
    assert read == stored  # every stored tensor, each byte once


def test_the_reader_converts_as_the_frameworks_do(tmp_path):
    """File.read at another float dtype, a chunk of rows at a time, equals the whole tensor converted at once."""
    torch = pytest.importorskip("torch")
    w = np.random.default_rng(0).standard_normal((3 * tensors.CHUNK_BYTES // 4096 + 5, 1024), np.float32)
    tensors.save({"w": w, "b": (tensors.f32_to_bf16(w), "BF16")}, tmp_path / "x.safetensors")
    with tensors.File(tmp_path / "x.safetensors") as f:
        assert len(list(f.chunks("w", "bfloat16"))) > 1
        want = torch.from_numpy(w).to(torch.bfloat16)
        assert np.array_equal(f.read("w", "bfloat16"), want.view(torch.uint16).numpy())
        assert np.array_equal(f.read("w", "float16"), torch.from_numpy(w).half().numpy())
        assert np.array_equal(f.read("b", "float32"), want.float().numpy())
        assert np.array_equal(f.read("b", "float16"), want.half().numpy())
        assert np.array_equal(f.read("b", r0=3, r1=9), f.read("b")[3:9])


def test_formats_share_one_interface(tmp_path):
    rng = np.random.default_rng(0)
    w = tensors.bf16_to_f32(tensors.f32_to_bf16(rng.standard_normal((64, 128), np.float32) * 0.05))
    packed, scales, biases = quant.quantize(w, 4, 32)
    tensors.save({"a.weight": packed, "a.scales": scales, "a.biases": biases,
                  "d.weight": (tensors.f32_to_bf16(w), "BF16")}, tmp_path / "x.safetensors")
    x, idx = rng.standard_normal((3, 128), np.float32), np.array([5, 0, 63])
    with tensors.File(tmp_path / "x.safetensors") as f:
        held = {"dense": formats.get("dense").from_stored(f, "d.weight"),
                "affine": formats.get("affine").from_stored(f, "a.weight", bits=4, group_size=32),
                "lossless": fixed4.from_bits(f.read("d.weight"), "bfloat16"),
                "planes": formats.get("planes").from_stored(f, "d.weight")}
    for name, obj in held.items():
        deq = obj.dequantize()
        assert type(obj) is formats.get(name) and deq.shape == w.shape, name
        if name != "affine":
            assert np.array_equal(deq, w), name  # bit-exact formats
        np.testing.assert_allclose(obj.matmul(x), x @ deq.T, rtol=1e-5, atol=1e-5, err_msg=name)
        assert np.array_equal(obj.rows(idx), deq[idx]), name
    assert np.array_equal(held["affine"].dequantize(), quant.dequantize(packed, scales, biases, 4, 32))
    assert formats.get("lossless").nbytes(w.shape, 2) == 16 + w.size // 2 + w.size
    assert formats.get("affine").nbytes(w.shape, 4, 4, 32, scale_bytes=2) == w.size // 2 + 2 * 64 * 4 * 2
    assert formats.get("planes").nbytes(w.shape) == planes.Planes.nbytes(w.shape, part="sketch") + \
        planes.Planes.nbytes(w.shape, part="rest")
    with pytest.raises(Exception, match="unknown weight format"):
        formats.get("q4_k")
