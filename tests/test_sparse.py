"""Sparse MLP: numpy reference, fitting, spec I/O and validation, both backends against the reference,
and an end-to-end calibrate -> load on both backends."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dn.core import activations
from dn.core.errors import DnError
from dn.core.tolerances import KERNEL, PARITY
from dn.formats import sparse
from dn.runtime import backend as backends
from dn.runtime import sparse_mlp

D, N = 128, 128  # N a multiple of sparse.GROUP: the sketch prior quantizes D along n


def _weights(rng, d=D, n=N):
    return tuple(rng.standard_normal(s).astype(np.float32) * 0.1 for s in ((n, d), (n, d), (d, n)))


def _layer(rng, keep, router="int4", prior="median", d=D, n=N, select=sparse.DEFAULT_SELECT, act="silu"):
    gate, up, down = _weights(rng, d, n)
    x = rng.standard_normal((256, d)).astype(np.float32)
    return sparse.fit_layer(x, gate, up, down, keep, 16, prior, router, select, act), (gate, up, down)


def test_reference_keep_all_no_prior_is_dense():
    rng = np.random.default_rng(0)
    layer, (g, u, dn) = _layer(rng, N, prior="none")
    x = rng.standard_normal((5, D)).astype(np.float32)
    np.testing.assert_allclose(sparse.sparse_mlp_step(x, sparse.bundle(g, u, dn), layer),
                               sparse.dense_mlp(x.astype(np.float64), g, u, dn), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("select", sparse.SELECTS)
def test_reference_drops_exactly_the_unrouted_neurons(select):
    rng = np.random.default_rng(1)
    layer, (g, u, dn) = _layer(rng, 40, prior="none", select=select)
    x = rng.standard_normal((3, D)).astype(np.float32)
    mask = sparse.route_mask(x, layer)
    if select == "topk":
        assert (mask.sum(1) == 40).all()
    else:  # the count varies per token; t_j = tau / |D_j|
        assert len(set(mask.sum(1))) > 1
        w = sparse.scores(x, layer) * np.linalg.norm(dn, axis=0)   # kept iff weighted score > one tau
        for t in range(len(x)):
            assert w[t][mask[t]].min() >= w[t][~mask[t]].max() * (1 - 1e-5)
    h = activations.silu(x.astype(np.float64) @ g.T) * (x.astype(np.float64) @ u.T)
    np.testing.assert_allclose(sparse.sparse_mlp_step(x, sparse.bundle(g, u, dn), layer), (h * mask) @ dn.T,
                               rtol=1e-9, atol=1e-12)


def test_median_prior_adds_c_for_skipped_neurons_only():
    rng = np.random.default_rng(2)
    layer, (g, u, dn) = _layer(rng, 30)
    assert np.abs(layer.prior_c).max() > 0
    np.testing.assert_allclose(layer.prior_y0, dn.astype(np.float64) @ layer.prior_c, rtol=1e-5, atol=1e-6)
    x = rng.standard_normal((2, D)).astype(np.float32)
    kept = sparse.route_mask(x, layer)
    h = activations.silu(x.astype(np.float64) @ g.T) * (x.astype(np.float64) @ u.T)
    want = np.where(kept, h, layer.prior_c) @ dn.T
    np.testing.assert_allclose(sparse.sparse_mlp_step(x, sparse.bundle(g, u, dn), layer), want, rtol=1e-5,
                               atol=1e-6)


def test_sketch_prior_adds_the_router_estimate_for_skipped_neurons_only():
    rng = np.random.default_rng(3)
    layer, (g, u, dn) = _layer(rng, 30, prior="sketch")
    assert not layer.prior_c.any() and layer.prior_a.shape == (D, N // 2)
    dq = sparse.dequantize_int4(layer.prior_a, layer.prior_b)
    assert np.abs(dq - dn).max() <= np.abs(dn).max() / 7 / 2 + 1e-6            # half an int4 step at worst
    x = rng.standard_normal((3, D)).astype(np.float32)
    kept = sparse.route_mask(x, layer)
    h = activations.silu(x.astype(np.float64) @ g.T) * (x.astype(np.float64) @ u.T)
    p = x.astype(np.float64) @ sparse.dequantize_int4(layer.router_a, layer.router_b).astype(np.float64).T
    est = activations.silu(p[:, :N]) * p[:, N:]
    want = np.where(kept, h, 0) @ dn.T + np.where(kept, 0, est) @ dq.T
    np.testing.assert_allclose(sparse.sparse_mlp_step(x, sparse.bundle(g, u, dn), layer), want, rtol=1e-4,
                               atol=1e-5)
    drop = np.where(kept, h, 0) @ dn.T
    assert np.abs(want - h @ dn.T).sum() < np.abs(drop - h @ dn.T).sum()  # it does recover part of the loss


def _no_sketch_without_up(router, prior):
    if router == "int4gate" and prior == "sketch":
        pytest.skip("int4gate has no up estimate for the sketch prior (test_int4gate_refuses_sketch)")


def test_int4gate_refuses_sketch(tmp_path):
    rng = np.random.default_rng(3)
    with pytest.raises(DnError, match="sketch prior needs"):
        _layer(rng, 30, "int4gate", "sketch")
    section = sparse.save(_spec(rng, router="int4", prior="sketch"), tmp_path) | {"router": "int4gate"}
    with pytest.raises(DnError, match="sketch prior needs"):
        sparse.load(tmp_path, section, 2, D, N)


def test_int4gate_scores_the_gate_and_weighs_up_into_thresholds():
    """int4gate routes on |act(g^)| alone (the int4 gate sketch) against t_j = tau / (|D_j| rms_j(U x))."""
    rng = np.random.default_rng(4)
    layer, (_, u, dn) = _layer(rng, 40, "int4gate", "none")
    assert layer.router_a.shape == (N, D // 2)
    x = rng.standard_normal((64, D)).astype(np.float32)
    gq = sparse.dequantize_int4(layer.router_a, layer.router_b)
    np.testing.assert_allclose(sparse.scores(x, layer), np.abs(activations.silu(x @ gq.T)), rtol=1e-5, atol=1e-6)
    weight = np.linalg.norm(dn, axis=0) * np.sqrt(np.mean(np.square(x @ u.T), axis=0))
    ratio = layer.thresh * weight    # one tau for every neuron, up to the calibration vs these inputs' rms
    assert ratio.std() / ratio.mean() < 0.2


def test_sketch_prior_needs_n_divisible_by_group():
    rng = np.random.default_rng(3)
    with pytest.raises(DnError, match="divisible"):
        _layer(rng, 30, prior="sketch", n=96)


def test_full_rank_router_matches_oracle():
    rng = np.random.default_rng(3)
    gate, up, down = _weights(rng)
    x = rng.standard_normal((512, D)).astype(np.float32)
    xe = rng.standard_normal((512, D)).astype(np.float32)
    for rank, lo, hi in ((D, 0.995, 1.0), (4, 0.0, 0.95)):
        layer = sparse.fit_layer(x, gate, up, down, 30, rank, "none", "lowrank")
        m = sparse.route_mask(xe, layer)
        if rank == D:  # the calibrated threshold keeps ~30 on fresh inputs
            assert abs(m.sum(1).mean() - 30) < 1
        assert lo <= sparse.recall(m, sparse.oracle_mask(xe, gate, up, down, m.sum(1))) <= hi


def test_int4_roundtrip_error_is_bounded():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((10, 2 * sparse.GROUP)).astype(np.float32)
    packed, s = sparse.quantize_int4(w)
    assert packed.dtype == np.uint8 and packed.shape == (10, sparse.GROUP)
    err = np.abs(sparse.dequantize_int4(packed, s) - w)
    assert (err <= np.repeat(s, sparse.GROUP, axis=1) / 2 + 1e-6).all()


@pytest.mark.parametrize("bad", [0, 1, -0.2, 1.5, float("nan")])
def test_sparsity_outside_unit_interval(bad):
    with pytest.raises(DnError, match="sparsity"):
        sparse.keep_count(bad, N)


def _spec(rng, layers=2, router="int4", select=sparse.DEFAULT_SELECT, prior="median"):
    fitted = [_layer(rng, 48, router, prior, select=select)[0] for _ in range(layers)]
    return sparse.SparseSpec(0.5, D, N, router=router, rank=16, prior=prior, select=select,
                             keep=[f.keep for f in fitted], layers=fitted)


@pytest.mark.parametrize("prior", sparse.PRIORS)
@pytest.mark.parametrize("select", sparse.SELECTS)
@pytest.mark.parametrize("router", sparse.ROUTERS)
def test_spec_roundtrip(tmp_path, router, select, prior):
    _no_sketch_without_up(router, prior)
    s = _spec(np.random.default_rng(5), router=router, select=select, prior=prior)
    section = json.loads(json.dumps(sparse.save(s, tmp_path)))
    back = sparse.load(tmp_path, section, 2, D, N)
    assert back.keep == s.keep and back.router == router and back.select == select and back.prior == prior
    x = np.random.default_rng(6).standard_normal((9, D)).astype(np.float32)
    for a, b in zip(back.layers, s.layers):
        for name in ("router_a", "router_b", "prior_c", "prior_y0", "thresh", "prior_a", "prior_b"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        np.testing.assert_array_equal(sparse.route_mask(x, a), sparse.route_mask(x, b))
        bq = sparse.bundle(*_weights(np.random.default_rng(1)))
        np.testing.assert_array_equal(sparse.sparse_mlp_step(x, bq, a), sparse.sparse_mlp_step(x, bq, b))


def test_gelu_tanh_is_torchs_tanh_gelu():
    torch = pytest.importorskip("torch")
    x = np.linspace(-8, 8, 1001)
    want = torch.nn.functional.gelu(torch.as_tensor(x), approximate="tanh").numpy()
    np.testing.assert_allclose(activations.apply("gelu_tanh", x), want, rtol=1e-12, atol=1e-12)
    assert np.abs(activations.apply("gelu_tanh", x) - activations.apply("silu", x)).max() > 0.1  # not silu renamed


def test_c_kernels_number_the_activations_as_the_table():
    """dn/formats/csrc/dn_kernels.h's ACT_* defines (read as text) are dn.core.activations' numbers, name for name."""
    import re
    from pathlib import Path

    header = (Path(sparse.__file__).parent / "csrc" / "dn_kernels.h").read_text()
    defines = {m[1].lower(): int(m[2]) for m in re.finditer(r"^#define ACT_(\w+) (\d+)$", header, re.M)}
    assert defines == {name: activations.kind(name) for name in activations.NAMES}


def test_one_activation_check():
    for bad in (lambda: activations.check("relu"), lambda: activations.apply("relu", np.zeros(2)),
                lambda: sparse.fit_layer(np.zeros((8, D), np.float32), *_weights(np.random.default_rng(0)), 4, 16,
                                         "none", "int4", name="relu")):
        with pytest.raises(DnError, match="unknown activation 'relu'"):
            bad()


def test_backend_acts_are_the_table(backend_name):
    """Each backend's ops.act, by dn's name, computes the table's numpy function."""
    rng = np.random.default_rng(4)
    layer, (g, u, dn) = _layer(rng, 40)
    mlp = backends.get(backend_name).make_sparse_mlp(sparse.bundle(g, u, dn), layer, "float32")
    o, x = mlp.ops, np.linspace(-8, 8, 401, dtype=np.float32)
    for name in activations.NAMES:
        got = o.to_numpy(o.act(name, o.from_numpy(x, mlp.prior_c)))
        np.testing.assert_allclose(got, activations.apply(name, x.astype(np.float64)), rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_act_roundtrip_and_old_files_are_silu(tmp_path):
    rng = np.random.default_rng(5)
    fitted = [_layer(rng, 48, act="gelu_tanh")[0] for _ in range(2)]
    s = sparse.SparseSpec(0.5, D, N, rank=16, prior="median", act="gelu_tanh", keep=[48, 48], layers=fitted)
    section = json.loads(json.dumps(sparse.save(s, tmp_path)))
    assert section["act"] == "gelu_tanh"
    back = sparse.load(tmp_path, section, 2, D, N)
    assert back.act == "gelu_tanh" and all(lay.act == "gelu_tanh" for lay in back.layers)
    section.pop("act")   # a file written before the field existed
    back = sparse.load(tmp_path, section, 2, D, N)
    assert back.act == "silu" and all(lay.act == "silu" for lay in back.layers)
    with pytest.raises(DnError, match="sparse spec: unknown activation 'relu'"):
        sparse.load(tmp_path, section | {"act": "relu"}, 2, D, N)


def test_v1_spec_still_loads_as_topk(tmp_path):
    s = _spec(np.random.default_rng(5), select="topk")
    section = sparse.save(s, tmp_path) | {"version": 1}
    section.pop("select")
    back = sparse.load(tmp_path, section, 2, D, N)
    assert back.select == "topk" and back.version == 1


@pytest.mark.parametrize("change,needle", [
    ({"num_layers": 3}, "num_layers"), ({"hidden": 64}, "hidden"), ({"intermediate": 7}, "intermediate"),
    ({"version": 99}, "version"), ({"router": "magic"}, "router"), ({"keep": [48]}, "keep"),
    ({"keep": [0, 48]}, "keep"), ({"file": "nope.safetensors"}, "missing"), ({"select": "magic"}, "selection")])
def test_spec_mismatch_is_a_clear_error(tmp_path, change, needle):
    section = sparse.save(_spec(np.random.default_rng(6)), tmp_path) | change
    with pytest.raises(DnError, match=needle):
        sparse.load(tmp_path, section, 2, D, N)


def test_sketch_section_without_sketch(tmp_path):
    section = sparse.save(_spec(np.random.default_rng(6)), tmp_path) | {"prior": "sketch"}
    with pytest.raises(DnError, match="prior.a is missing"):
        sparse.load(tmp_path, section, 2, D, N)


def test_threshold_section_without_thresholds(tmp_path):
    section = sparse.save(_spec(np.random.default_rng(6), select="topk"), tmp_path) | {"select": "threshold"}
    with pytest.raises(DnError, match="router.t is missing"):
        sparse.load(tmp_path, section, 2, D, N)


def test_spec_tensor_with_wrong_shape(tmp_path):
    from dn.core import tensors as safetensors_io

    section = sparse.save(_spec(np.random.default_rng(7)), tmp_path)
    t = {k: v for k, (v, _) in safetensors_io.load(tmp_path / sparse.FILE, mmap=False).items()}
    t["layers.1.prior.c"] = np.zeros(N - 1, np.float32)
    safetensors_io.save(t, tmp_path / sparse.FILE)
    with pytest.raises(DnError, match="layers.1.prior.c"):
        sparse.load(tmp_path, section, 2, D, N)


# ---- backends against the reference ---------------------------------------------------------------

@pytest.mark.parametrize("prior", ["median", "sketch"])
@pytest.mark.parametrize("select", sparse.SELECTS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("router", sparse.ROUTERS)
def test_backend_step_matches_reference(backend_name, dtype, router, select, prior):
    _no_sketch_without_up(router, prior)
    mod = backends.get(backend_name)
    rng = np.random.default_rng(8)
    layer, (g, u, dn) = _layer(rng, 40, router, prior, select=select)
    mlp = mod.make_sparse_mlp(sparse.bundle(g, u, dn), layer, dtype)
    x = rng.standard_normal((7, D)).astype(np.float32)
    bq = sparse.bundle(g, u, dn)
    if dtype == "bfloat16":  # the reference sees the same rounded weights and inputs
        from dn.core.tensors import bf16_to_f32, f32_to_bf16

        bq, x = bf16_to_f32(f32_to_bf16(bq)), bf16_to_f32(f32_to_bf16(x))
        layer.prior_c = bf16_to_f32(f32_to_bf16(layer.prior_c))
        layer.prior_y0 = bf16_to_f32(f32_to_bf16(layer.prior_y0))
    mask = sparse_mlp.route(x, mlp)
    want = sparse.sparse_mlp_step(x, bq, layer, mask)
    tol = KERNEL[dtype]
    scale = np.abs(want).max()
    got = {"masked": sparse_mlp.step(x, mlp, "masked"),   # all tokens; gather: one token per step
           "gather": np.concatenate([sparse_mlp.step(x[t:t + 1], mlp, "gather") for t in range(len(x))])}
    got |= _native_paths(mlp, x)
    for path, y in got.items():
        np.testing.assert_allclose(y, want, rtol=tol.rtol, atol=tol.atol * scale, err_msg=path)


def _native_paths(mlp, x) -> dict:
    """The C kernel (dn/formats/csrc/sparse.c, torch on CPU) where it runs: all tokens at once (each bundle read once
    for
    the tokens keeping it) and one token per step, as decoding calls it; on a split layer (router planes, bf16)
    dn/formats/csrc/planes.c, 4 tokens and one at a time. Empty elsewhere (MLX, DN_NATIVE=0)."""
    if mlp.split:
        if "mat" not in mlp.planes[0] or mlp.select != "threshold":
            return {}
        return {"planes-4": np.concatenate([sparse_mlp.step(x[t:t + 4], mlp, "native") for t in range(0, len(x), 4)]),
                "planes-1": np.concatenate([sparse_mlp.step(x[t:t + 1], mlp, "native") for t in range(len(x))])}
    if not (sparse_mlp.can(mlp.ops, "native_sparse") and mlp.ops.native_available(mlp.prior_c, mlp.bundled)):
        return {}
    return {"native": sparse_mlp.step(x, mlp, "native"),
            "native-1": np.concatenate([sparse_mlp.step(x[t:t + 1], mlp, "native") for t in range(len(x))])}


@pytest.mark.parametrize("prior", ["median", "sketch"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_backend_gelu_tanh_step_matches_reference(backend_name, dtype, prior):
    """GeGLU (Gemma): the reference with act gelu_tanh against each backend's gather and masked paths, and the
    router's estimate (it routes and feeds the sketch) against the reference's."""
    from dn.core.tensors import bf16_to_f32, f32_to_bf16

    mod = backends.get(backend_name)
    rng = np.random.default_rng(13)
    layer, (g, u, dn) = _layer(rng, 40, "int4", prior, act="gelu_tanh")
    silu_layer = sparse.fit_layer(rng.standard_normal((256, D)).astype(np.float32), g, u, dn, 40, 16, prior)
    mlp = mod.make_sparse_mlp(sparse.bundle(g, u, dn), layer, dtype)
    assert mlp.act == "gelu_tanh"
    x = rng.standard_normal((5, D)).astype(np.float32)
    bq = sparse.bundle(g, u, dn)
    if dtype == "bfloat16":
        bq, x = bf16_to_f32(f32_to_bf16(bq)), bf16_to_f32(f32_to_bf16(x))
        layer.prior_c = bf16_to_f32(f32_to_bf16(layer.prior_c))
        layer.prior_y0 = bf16_to_f32(f32_to_bf16(layer.prior_y0))
    mask = sparse_mlp.route(x, mlp)
    assert (mask == sparse.route_mask(x, layer)).mean() >= 0.99
    want = sparse.sparse_mlp_step(x, bq, layer, mask)
    other = sparse.sparse_mlp_step(x, bq, silu_layer, mask)
    tol, scale = KERNEL[dtype], np.abs(want).max()
    got = {"masked": sparse_mlp.step(x, mlp, "masked"),
           "gather": np.concatenate([sparse_mlp.step(x[t:t + 1], mlp, "gather") for t in range(len(x))])}
    got |= _native_paths(mlp, x)
    assert backend_name != "torch" or "native" in got or os.environ.get("DN_NATIVE") == "0"
    for path, y in got.items():
        np.testing.assert_allclose(y, want, rtol=tol.rtol, atol=tol.atol * scale, err_msg=path)
        assert np.abs(y - other).max() > 3 * tol.atol * scale, path   # silu would not pass


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_native_kernel_threads_match_reference(monkeypatch, dtype):
    """The C kernel's OpenMP split (a y per thread, summed) against the reference: forced on this small layer."""
    torch = pytest.importorskip("torch")
    from dn.core.tensors import bf16_to_f32, f32_to_bf16
    from dn_torch import kernels

    rng = np.random.default_rng(14)
    layer, (g, u, dn) = _layer(rng, 40, "int4", "median")
    mlp = backends.get("torch").make_sparse_mlp(sparse.bundle(g, u, dn), layer, dtype)
    if not kernels.native_available(mlp.prior_c, mlp.bundled):
        pytest.skip("no C compiler or DN_NATIVE=0")
    x, bq = rng.standard_normal((3, D)).astype(np.float32), sparse.bundle(g, u, dn)
    if dtype == "bfloat16":
        bq, x = bf16_to_f32(f32_to_bf16(bq)), bf16_to_f32(f32_to_bf16(x))
        layer.prior_c = bf16_to_f32(f32_to_bf16(layer.prior_c))
        layer.prior_y0 = bf16_to_f32(f32_to_bf16(layer.prior_y0))
    monkeypatch.setattr(kernels, "_PER_THREAD", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        mask = sparse_mlp.route(x, mlp)
        got = sparse_mlp.step(x, mlp, "native")
    finally:
        torch.set_num_threads(threads)
    want = sparse.sparse_mlp_step(x, bq, layer, mask)
    tol = KERNEL[dtype]
    np.testing.assert_allclose(got, want, rtol=tol.rtol, atol=tol.atol * np.abs(want).max())


@pytest.mark.parametrize("prior", ["median", "sketch"])
def test_backend_step_with_no_neuron_kept(backend_name, prior):
    """Threshold selection can keep no neuron for a token (seen at sparsity 0.7 on the real model): every path
    returns the prior alone, as the reference does."""
    mod = backends.get(backend_name)
    rng = np.random.default_rng(12)
    layer, (g, u, dn) = _layer(rng, 40, "int4", prior, select="threshold")
    layer.thresh = np.full(N, np.inf, np.float32)
    x = rng.standard_normal((3, D)).astype(np.float32)
    mlp = mod.make_sparse_mlp(sparse.bundle(g, u, dn), layer, "float32")
    assert not sparse_mlp.route(x, mlp).any()
    want = sparse.sparse_mlp_step(x, sparse.bundle(g, u, dn), layer)
    paths = ["gather", "masked"] + [p for p in [_hardware_path(mlp)] if p] + list(_native_paths(mlp, x[:1]))[:1]
    for path in paths:
        got = np.concatenate([sparse_mlp.step(x[t:t + 1], mlp, path) for t in range(len(x))])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(np.abs(want).max(), 1e-6), err_msg=path)


def _hardware_path(mlp) -> str | None:
    """The fused kernel path this machine can run for real: Metal on an Apple GPU, Triton on CUDA."""
    return "fused" if sparse_mlp.can(mlp.ops, "fused_sparse") and mlp.ops.fused_available(mlp.prior_c) else None


@pytest.mark.parametrize("prior", ["median", "sketch"])
@pytest.mark.parametrize("select", sparse.SELECTS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hardware_kernel_matches_reference(backend_name, dtype, select, prior):
    """Metal (macOS CI's GPU step, DN_MLX_DEVICE=gpu) and Triton (CUDA) kernels against the numpy reference, one
    token per step as decoding runs them; skipped where neither exists (tests/test_metal_sparse_host.py and
    test_triton_kernel_in_interpreter check the same bodies on the host)."""
    from dn.core.tensors import bf16_to_f32, f32_to_bf16

    rng = np.random.default_rng(10)
    layer, (g, u, dn) = _layer(rng, 40, "int4", prior, select=select)
    bq = sparse.bundle(g, u, dn)
    mlp = backends.get(backend_name).make_sparse_mlp(bq, layer, dtype)
    path = _hardware_path(mlp)
    if path is None:
        pytest.skip(f"no GPU kernel for {backend_name} on this machine")
    x = rng.standard_normal((5, D)).astype(np.float32)
    if dtype == "bfloat16":
        bq, x = bf16_to_f32(f32_to_bf16(bq)), bf16_to_f32(f32_to_bf16(x))
        layer.prior_c = bf16_to_f32(f32_to_bf16(layer.prior_c))
        layer.prior_y0 = bf16_to_f32(f32_to_bf16(layer.prior_y0))
    for t in range(len(x)):
        want = sparse.sparse_mlp_step(x[t:t + 1], bq, layer, sparse_mlp.route(x[t:t + 1], mlp))
        got = sparse_mlp.step(x[t:t + 1], mlp, path)
        tol = KERNEL[dtype]
        np.testing.assert_allclose(got, want, rtol=tol.rtol, atol=tol.atol * np.abs(want).max(), err_msg=path)


@pytest.mark.parametrize("select", sparse.SELECTS)
@pytest.mark.parametrize("router", sparse.ROUTERS)
def test_backend_router_agrees_with_reference(backend_name, router, select):
    mod = backends.get(backend_name)
    rng = np.random.default_rng(9)
    layer, (g, u, dn) = _layer(rng, 40, router, select=select)
    mlp = mod.make_sparse_mlp(sparse.bundle(g, u, dn), layer, "float32")
    x = rng.standard_normal((200, D)).astype(np.float32)
    got, want = sparse_mlp.route(x, mlp), sparse.route_mask(x, layer)
    assert got.shape == want.shape == (200, N) and got.dtype == bool
    assert (got == want).mean() >= 0.999


def test_triton_kernel_in_interpreter():
    """The fused Triton kernel against the reference on CPU (TRITON_INTERPRET=1); CUDA runs it for real."""
    pytest.importorskip("triton")
    code = (
        "import numpy as np, torch\nfrom dn.formats import sparse as ref\nfrom dn_torch import kernels, sparse as ts\n"
        "rng = np.random.default_rng(0)\nd, n = 128, 200\n"
        "g, u, dn = (rng.standard_normal(s).astype(np.float32) * 0.05 for s in ((n, d), (n, d), (d, n)))\n"
        "x = rng.standard_normal((256, d)).astype(np.float32)\n"
        "layer = ref.fit_layer(x, g, u, dn, 70, 8, 'median', 'lowrank')\n"
        "mlp = ts.make_sparse_mlp(ref.bundle(g, u, dn), layer, 'float32', 'cpu')\n"
        "from dn.runtime import sparse_mlp\nx1 = x[:1]\nm = sparse_mlp.route(x1, mlp)\n"
        "want = ref.sparse_mlp_step(x1, ref.bundle(g, u, dn), layer, m)\n"
        "idx = np.flatnonzero(m[0])\n"
        "got = kernels.triton_step(torch.as_tensor(x1), mlp.bundled, torch.as_tensor(idx), mlp.prior_c,"
        " mlp.prior_y0, block_k=16, block_d=64).numpy()\n"
        "assert np.allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max()), np.abs(got - want).max()\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], env=os.environ | {"TRITON_INTERPRET": "1"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


# ---- end to end: calibrate on the default model, load on each backend -----------------------------

@pytest.fixture(scope="module")
def sparse_model(tmp_path_factory, default_model_dir, default_spec, calib_text):
    from dn.runtime import calibrate
    from dn.runtime.writer import copy_dense

    out = tmp_path_factory.mktemp("sparse")
    copy_dense(default_model_dir, out)
    text = calib_text.read_text(encoding="utf-8")[:6000]
    section = calibrate.calibrate(default_model_dir, out, 0.5, text, seed=0, backend="torch", max_tokens=512,
                                  progress=False)
    spec = type(default_spec)(default_spec.architecture, default_spec.tensors, sparse=section)
    spec.save(out)
    return out, spec, section


def test_calibrate_is_deterministic(sparse_model, default_model_dir, calib_text, tmp_path):
    """The same bytes again, and at another torch thread count than the fixture's: float32 reductions that split by
    thread would show here (none do: 1, 2, 3, 4 and 8 torch threads, 1, 2 and 4 OpenBLAS threads gave one file)."""
    import torch

    from dn.runtime import calibrate

    out, _, section = sparse_model
    text = calib_text.read_text(encoding="utf-8")[:6000]
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        again = calibrate.calibrate(default_model_dir, tmp_path, 0.5, text, seed=0, backend="torch", max_tokens=512,
                                    progress=False)
    finally:
        torch.set_num_threads(threads)
    assert again == section
    assert (tmp_path / sparse.FILE).read_bytes() == (out / sparse.FILE).read_bytes()


@pytest.mark.parametrize("kwargs,needle", [({"calib_text": "  \n"}, "empty"), ({"sparsity": 1.0}, "sparsity"),
                                           ({"prior": "magic"}, "prior"), ({"router": "magic"}, "router")])
def test_calibrate_bad_input_writes_nothing(default_model_dir, tmp_path, kwargs, needle):
    from dn.runtime import calibrate

    args = {"sparsity": 0.5, "calib_text": "Some text."} | kwargs
    with pytest.raises(DnError, match=needle):
        calibrate.calibrate(default_model_dir, tmp_path, progress=False, **args)
    assert not any(tmp_path.iterdir())


def test_sparse_parity_on_both_backends(sparse_model):
    """dn parity on a sparse folder: router decisions on the same inputs agree >= ROUTE_AGREEMENT, and
    under the reference's routing the logits, hidden states and greedy tokens meet the dense thresholds."""
    pytest.importorskip("mlx_lm")
    from parity.run import run_parity

    out, _, _ = sparse_model
    r = run_parity(str(out), ["mlx", "torch"], "float32", 16)
    assert r["sparse"] and r["passed"], r
    assert r["route_agreement"] >= 0.999 and r["max_rel_err"] <= PARITY["float32"].max_rel_err
    assert r["greedy_agreement"] == 1.0


def test_replayed_routes_are_executed(backend_name, sparse_model, prompt_tokens):
    """Replay really overrides the router: its own decisions reproduce the logits, flipped ones do not."""
    out, spec, _ = sparse_model
    be = backends.get(backend_name)
    model = be.load(out, spec, "float32")
    tokens = np.asarray(prompt_tokens)[:, :12]
    tapes = sparse_mlp.tape_routes(model)
    want = be.logits(model, tokens)
    sparse_mlp.tape_routes(model, tapes)
    same = be.logits(model, tokens)
    flipped = [[~m for m in layer] for layer in tapes]
    sparse_mlp.tape_routes(model, flipped)
    other = be.logits(model, tokens)
    sparse_mlp.untape_routes(model)
    np.testing.assert_allclose(same, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert np.abs(other - want).max() > 0.1 * np.abs(want).max()


def test_sparse_footprint_accounted_matches_measured(backend_name, sparse_model, tmp_path):
    """A sparse folder's resident bytes as the platform measures its load (dn footprint, a fresh process: see
    tests/test_memory.py) match what dn footprint accounts for it: the dense weights in their bundles plus the
    packed router, thresholds and prior."""
    from helpers import run_dn
    from test_memory import matches_accounted, off_by

    out, _, _ = sparse_model
    proc = run_dn("footprint", "--model", str(out), "--backend", backend_name, "--json", str(tmp_path / "fp.json"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "fp.json").read_text())
    acc = report["accounted"]["resident_weight_bytes"]
    assert matches_accounted(report["measured"], acc), off_by(report["measured"], acc)


def _held_bytes(mlp) -> int:
    """Bytes of the arrays a backend module holds (the unit check of the accounting formula; whole models are
    measured by the platform in tests/test_memory.py)."""
    if hasattr(mlp, "buffers"):
        return sum(t.nbytes for t in mlp.buffers())
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(mlp.parameters()))


@pytest.mark.parametrize("prior", sparse.PRIORS)
@pytest.mark.parametrize("router", sparse.ROUTERS)
def test_side_bytes_are_what_a_layer_holds(backend_name, router, prior):
    """dn.model.store.sparse_side (what dn footprint adds per layer) equals the bytes a backend's SparseMLP holds
    besides its bundled weights, for every router and prior kind."""
    _no_sketch_without_up(router, prior)
    from dn.model import store

    layer, w = _layer(np.random.default_rng(11), 40, router, prior)
    mlp = backends.get(backend_name).make_sparse_mlp(sparse.bundle(*w), layer, "float32")
    section = {"hidden": D, "intermediate": N, "rank": 16, "router": router, "prior": prior,
               "select": layer.select, "num_layers": 1}
    assert _held_bytes(mlp) - 3 * D * N * 4 == store.sparse_side(section, 4)["held"]


def test_replayed_routes_follow_tokens_not_calls():
    """A tape replayed on a backend that splits its calls otherwise (a prompt prefilled in one call on one backend,
    in two on the other) gives each call the decisions of its own tokens."""
    from dn.runtime.sparse_mlp import take_rows

    a, b = np.arange(12).reshape(6, 2), np.arange(12, 14).reshape(1, 2)
    tape = [a, b]
    assert (take_rows(tape, 5) == a[:5]).all() and (take_rows(tape, 2) == np.vstack([a[5:], b])).all() and not tape
    tape = [a[:2], a[2:], b]
    assert (take_rows(tape, 6) == a).all() and (take_rows(tape, 1) == b).all()
