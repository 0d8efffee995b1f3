"""Calibration for `dn convert --sparsity`: run the dense model over calibration text through a backend,
fit each layer's router and prior in numpy (dn/formats/sparse.py), write the sparse spec file. Also each layer's
MLP inputs over calibration text, which rank residency's neurons (mlp_inputs).

Deterministic for a given seed: the seed picks which calibration windows are used; fitting is exact
linear algebra on those windows' MLP inputs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from dn.core import text
from dn.core.errors import DnError
from dn.formats import sparse
from dn.model import store
from dn.model.spec import ModelSpec, load_spec
from dn.model.tokenizer import Tokenizer
from dn.runtime import backend as backends

CTX = 512            # tokens per calibration window
MAX_TOKENS = 16384   # calibration tokens used (windows sampled by seed)


def calibration_windows(tokens: list[int], seed: int, ctx: int = CTX, max_tokens: int = MAX_TOKENS) -> np.ndarray:
    """[W, ctx] windows of the calibration tokens, a seeded sample of at most max_tokens // ctx."""
    if len(tokens) < 2:
        raise DnError("the calibration text has fewer than two tokens")
    ctx = min(ctx, len(tokens))
    wins = np.stack([tokens[i:i + ctx] for i in range(0, len(tokens) - ctx + 1, ctx)])
    want = max(1, max_tokens // ctx)
    if len(wins) > want:
        pick = np.sort(np.random.default_rng(seed).choice(len(wins), want, replace=False))
        wins = wins[pick]
    return wins


def fit_model(inputs: list[np.ndarray], weights, sparsity: float, prior: str, rank: int,
              progress: bool = True, router: str = sparse.DEFAULT_ROUTER,
              select: str = sparse.DEFAULT_SELECT, act: str = sparse.DEFAULT_ACT) -> list[sparse.LayerSparse]:
    """inputs[i] [T, d]; weights(i) -> (gate, up, down) float32 -> fitted layers (act: the MLP's activation)."""
    layers, progress = [], progress and sys.stderr.isatty()  # \r status lines only on a terminal, not in a log
    for i, x in enumerate(inputs):
        gate, up, down = weights(i)
        layers.append(sparse.fit_layer(x, gate, up, down, sparse.keep_count(sparsity, gate.shape[0]),
                                       rank, prior, router, select, act))
        if progress:
            print(f"\rfitting routers and priors: layer {i + 1}/{len(inputs)}", end="", file=sys.stderr)
    if progress:
        print(file=sys.stderr)
    return layers


def calibrate(model_dir: Path, out_dir: Path, sparsity: float, calib_text: str, prior: str | None = None,
              seed: int = 0, backend: str = "auto", rank: int = sparse.DEFAULT_RANK,
              max_tokens: int = MAX_TOKENS, progress: bool = True, router: str | None = None,
              dense_mlp: bool | None = None,
              select: str = sparse.DEFAULT_SELECT) -> dict:
    """Fit routers + priors on calib_text (the text itself), write sparse.FILE into out_dir, return the
    `sparse` section for dn_spec.json. Raises DnError before writing anything on bad input."""
    prior = prior or sparse.DEFAULT_PRIOR
    if prior not in sparse.PRIORS:
        raise DnError(f"unknown prior {prior!r} (choose from {', '.join(sparse.PRIORS)})")
    spec = load_spec(model_dir)
    n = spec.architecture.intermediate_size
    sparse.keep_count(sparsity, n)
    if not calib_text or not calib_text.strip():
        raise DnError("the calibration text is empty")
    if router is not None and router not in sparse.ROUTERS:
        raise DnError(f"unknown router {router!r} (choose from {', '.join(sparse.ROUTERS)})")
    if select not in sparse.SELECTS:
        raise DnError(f"unknown selection {select!r} (choose from {', '.join(sparse.SELECTS)})")
    if not 0 < rank <= min(spec.architecture.hidden_size, 2 * n):
        raise DnError(f"router rank {rank} out of range")
    act = spec.architecture.mlp_act
    tokens = Tokenizer(model_dir, spec.architecture.eos_token_id).encode(calib_text)
    wins = calibration_windows(tokens, seed, max_tokens=max_tokens)
    be = backends.resolve(backend)
    # dense_mlp: the MLP weights the spec will run on are dense (dn convert knows; default: this folder's)
    router = router or sparse.default_router(be.NAME, be.device_name(),
                                             store.mlp_dense(spec) if dense_mlp is None else dense_mlp)
    plain = type(spec)(spec.architecture, spec.tensors)   # dense model: no codec/sparse sections
    model = be.load(model_dir, plain, "float32") if spec.codec is None else be.load(model_dir, spec, "float32")
    parts, progress = [], progress and sys.stderr.isatty()
    for j, w in enumerate(wins):  # one window at a time keeps the progress bar honest
        parts.append(be.collect_mlp_inputs(model, [w[None]]))
        if progress:
            print(f"\rcalibration forward passes: {j + 1}/{len(wins)}", end="", file=sys.stderr)
    if progress:
        print(file=sys.stderr)
    inputs = [np.concatenate(p) for p in zip(*parts)]
    layers = fit_model(inputs, lambda i: be.mlp_weights(model, i), sparsity, prior, rank, progress, router,
                       select, act)
    be.free(model)
    s = sparse.SparseSpec(sparsity, spec.architecture.hidden_size, n, router=router, rank=rank, prior=prior,
                          select=select, act=act,
                          keep=[layer.keep for layer in layers], layers=layers,
                          calibration={"tokens": int(wins.size), "windows": len(wins), "ctx": int(wins.shape[1]),
                                       "seed": seed, "text_sha256": sparse.text_digest(calib_text),
                                       "backend": be.NAME})
    return sparse.save(s, Path(out_dir))


def mlp_inputs(backend, model_dir: Path, spec: ModelSpec, calib_text: str, tokens: int = 2048) -> list[np.ndarray]:
    """Each layer's MLP inputs over the first `tokens` tokens of the calibration text file calib_text (the full
    model runs once, in float32): what ranks residency's neurons by activation."""
    ids = Tokenizer(model_dir, spec.architecture.eos_token_id).encode(text.read_text(Path(calib_text)))[:tokens]
    if len(ids) < 64:
        raise DnError(f"calibration text {calib_text} has {len(ids)} tokens; residency needs at least 64")
    model = backend.load(model_dir, spec, "float32")
    try:
        win = 512
        batches = [np.array([ids[i:i + win]]) for i in range(0, len(ids) - win + 1, win)] or [np.array([ids])]
        return backend.collect_mlp_inputs(model, batches)
    finally:
        del model
        backend.free(None)
