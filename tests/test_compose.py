"""Every weight format composes with the sparse MLP, on both backends (a tiny random Llama).

Formats: dense, lossless (bit-exact, so it must match dense exactly) and affine-quantized (matches a dense
folder holding the dequantized weights). Each runs plain and with one sparse spec; the sparse model over any
format must compute what the same spec computes over dense weights, in prefill (masked path) and in cached
decoding (one token: the gather path, which reads kept rows from the format's own storage).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from test_families import H, tiny_model

from dn.core import tensors as safetensors_io
from dn.formats import sparse
from dn.model.spec import load_spec
from dn.runtime.generation import generate_tokens

INTER = 128  # a multiple of sparse.GROUP: the sketch prior quantizes the down matrix along n
TOKENS = np.random.default_rng(1).integers(0, 128, size=(1, 12))


def _dense_weights(folder) -> dict[str, np.ndarray]:
    out = {}
    for name, (a, dt) in safetensors_io.load(folder / "model.safetensors").items():
        out[name] = safetensors_io.bf16_to_f32(a) if dt == "BF16" else np.asarray(a, np.float32)
    return out


def _add_sparse(src, dst, layers) -> None:
    """Copy folder src to dst and give it the sparse spec fitted on the dense weights."""
    shutil.copytree(src, dst)
    spec = load_spec(dst)
    s = sparse.SparseSpec(0.5, H, INTER, keep=[layer.keep for layer in layers], layers=layers,
                          calibration={"tokens": 0, "note": "random inputs (test)"})
    spec.sparse = sparse.save(s, dst)
    spec.save(dst)


def _fit(dense_dir) -> list[sparse.LayerSparse]:
    w = _dense_weights(dense_dir)
    rng = np.random.default_rng(2)
    layers = []
    for i in range(2):
        p = f"model.layers.{i}.mlp."
        x = rng.standard_normal((256, H)).astype(np.float32)
        layers.append(sparse.fit_layer(x, w[p + "gate_proj.weight"], w[p + "up_proj.weight"],
                                       w[p + "down_proj.weight"], INTER // 2, 16, "sketch"))
    return layers


def _quantized(dense_dir, out):
    """A -q folder (4 bits, groups of 32) and its twin: a dense folder holding the dequantized weights."""
    from dn.formats import quant
    from dn.runtime.writer import convert

    convert(dense_dir, out, None, None, quant={"bits": 4, "group_size": 32})
    twin = out.with_name(out.name + "-dequantized")
    shutil.copytree(dense_dir, twin)
    stored = safetensors_io.load(out / "model.safetensors")
    w = {}
    for name, (a, dt) in stored.items():
        if name.endswith(".scales") or name.endswith(".biases"):
            continue
        base = name.removesuffix(".weight")
        if base + ".scales" in stored:
            s, b = (safetensors_io.bf16_to_f32(stored[base + k][0]) if stored[base + k][1] == "BF16"
                    else np.asarray(stored[base + k][0], np.float32) for k in (".scales", ".biases"))
            w[name] = quant.dequantize(np.asarray(a), s, b, 4, 32)
        else:
            w[name] = safetensors_io.bf16_to_f32(a) if dt == "BF16" else np.asarray(a, np.float32)
    safetensors_io.save(w, twin / "model.safetensors")  # float32: the dequantized values exactly
    return out, twin


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{(format, sparse?): (folder, the folder it must match)}."""
    pytest.importorskip("mlx_lm")
    from dn.runtime.writer import convert

    root = tmp_path_factory.mktemp("compose")
    dense = tiny_model(root / "dense", "llama", inter=INTER)
    convert(dense, root / "lossless", "lossless", None)
    layers = _fit(dense)
    out = {("dense", False): (dense, dense), ("lossless", False): (root / "lossless", dense)}
    q, twin = _quantized(dense, root / "q4g32")
    out[("q4g32", False)] = (q, twin)
    _add_sparse(twin, root / "q4g32-dequantized+sparse", layers)
    _add_sparse(dense, root / "dense+sparse", layers)
    for fmt in [f for f, _ in list(out) if f != "dense"]:
        ref = "q4g32-dequantized+sparse" if fmt == "q4g32" else "dense+sparse"
        _add_sparse(out[(fmt, False)][0], root / f"{fmt}+sparse", layers)
        out[(fmt, True)] = (root / f"{fmt}+sparse", root / ref)
    out[("dense", True)] = (root / "dense+sparse", root / "dense+sparse")
    return out


def _run(be, folder):
    model = be.load(folder, load_spec(folder), "float32")
    logits = be.logits(model, TOKENS)[0]
    greedy = list(generate_tokens(be, model, list(TOKENS[0, :6]), 6))
    cache = be.make_cache(model)  # decode steps one token at a time through the cache: the gather path
    be.logits(model, TOKENS[:, :6], cache)
    steps = np.concatenate([be.logits(model, TOKENS[:, t:t + 1], cache)[0] for t in range(6, 12)])
    return logits, greedy, steps


@pytest.mark.parametrize("sparse_mlp", [False, True], ids=["plain", "sparse"])
@pytest.mark.parametrize("fmt", ["dense", "lossless", "q4g32"])
def test_format_runs_and_matches_its_reference(backend, folders, fmt, sparse_mlp):
    folder, ref = folders[(fmt, sparse_mlp)]
    logits, greedy, steps = _run(backend, folder)
    assert np.isfinite(logits).all() and len(greedy) == 6
    want, want_greedy, want_steps = _run(backend, ref)
    scale = np.abs(want).max()
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(steps, want_steps, rtol=1e-5, atol=1e-5 * scale)
    assert greedy == want_greedy
    # the cached one-token steps agree with the full forward (the gather path vs the masked one)
    np.testing.assert_allclose(steps, logits[6:], rtol=1e-4, atol=1e-4 * scale)


# ---- bad input in every folder kind: one line, no traceback ----------------------------------------------

def _copy_with_tokenizer(folder, dst, default_model_dir):
    shutil.copytree(folder, dst)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / name, dst / name)
    return dst


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) * 2 // 3])


@pytest.mark.parametrize("kind", ["lossless", "q4g32", "dense+sparse", "q4g32+sparse"])
def test_truncated_weights_are_one_line(backend_name, folders, tmp_path, default_model_dir, kind):
    from helpers import assert_one_line_error
    from helpers import run_dn as dn

    fmt, sp = kind.removesuffix("+sparse"), kind.endswith("+sparse")
    folder = _copy_with_tokenizer(folders[(fmt, sp)][0], tmp_path / "m", default_model_dir)
    for victim in sorted(folder.glob("*.safetensors")):
        saved = victim.read_bytes()
        _truncate(victim)
        proc = dn("footprint", "--model", str(folder), "--backend", backend_name)
        assert_one_line_error(proc, victim.name)
        victim.write_bytes(saved)
    proc = dn("footprint", "--model", str(folder), "--backend", backend_name)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("kind", ["dense", "lossless", "q4g32", "dense+sparse"])
def test_spec_that_does_not_match_its_tensors_is_one_line(folders, tmp_path, default_model_dir, kind):
    import json

    from helpers import assert_one_line_error
    from helpers import run_dn as dn

    fmt, sp = kind.removesuffix("+sparse"), kind.endswith("+sparse")
    folder = _copy_with_tokenizer(folders[(fmt, sp)][0], tmp_path / "m", default_model_dir)
    spec = load_spec(folder)
    spec.architecture.intermediate_size += 64
    spec.save(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | {"intermediate_size": cfg["intermediate_size"] + 64}))
    assert_one_line_error(dn("footprint", "--model", str(folder), "--backend", "torch"), "shape")
