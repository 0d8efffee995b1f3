"""The fused sparse Triton kernel (dn_torch/kernels.py) against the numpy reference dn.formats.sparse.sparse_mlp_step:
in Triton's interpreter on CPU (a subprocess with TRITON_INTERPRET=1, where Triton is installed) and for real on
CUDA (marked gpu). One token per call, as decoding runs it; hidden sizes that are and are not multiples of the
kernel's block, kept counts from 1 to all, median and sketch priors, both selections, float32 and bfloat16."""

import importlib.util
import itertools
import os

import numpy as np
import pytest
from helpers import assert_runs_in_triton_interpreter

from dn.core import activations
from dn.core.tolerances import KERNEL
from dn.formats import sparse as ref
from dn.runtime import sparse_mlp

torch = pytest.importorskip("torch")


def bf16_round(a: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(torch.bfloat16).float().numpy()


# (d, n, keep, router, prior, select, dtype)
CASES = [
    (64, 96, 40, "int4", "median", "topk", "float32"),
    (128, 200, 70, "int4", "median", "threshold", "float32"),
    (100, 150, 60, "lowrank", "median", "topk", "float32"),     # d not a multiple of the block
    (192, 128, 1, "int4", "median", "topk", "float32"),         # one kept neuron
    (64, 80, 80, "lowrank", "median", "topk", "float32"),       # all kept
    (576, 384, 190, "int4", "sketch", "topk", "bfloat16"),      # the default model's hidden size
    (128, 256, 100, "int4", "median", "threshold", "bfloat16"),
]


def check_sparse(device: str, seed: int = 0) -> int:
    from dn_torch import sparse as ts

    rng = np.random.default_rng(seed)
    count = 0
    for d, n, keep, router, prior, select, dtype in CASES:
        gate, up = (rng.standard_normal((n, d)).astype(np.float32) * 0.05 for _ in range(2))
        down = rng.standard_normal((d, n)).astype(np.float32) * 0.05
        calib = rng.standard_normal((256, d)).astype(np.float32)
        layer = ref.fit_layer(calib, gate, up, down, keep, 8, prior, router, select)
        bundled = ref.bundle(gate, up, down)
        mlp = ts.make_sparse_mlp(bundled, layer, dtype, device)
        x = rng.standard_normal((3, d)).astype(np.float32)
        if dtype == "bfloat16":  # the reference computes on the values the kernel reads
            bundled, x = bf16_round(bundled), bf16_round(x)
            layer.prior_c, layer.prior_y0 = bf16_round(layer.prior_c), bf16_round(layer.prior_y0)
        tol = KERNEL[dtype]
        for t in range(len(x)):
            mask = sparse_mlp.route(x[t:t + 1], mlp)
            want = ref.sparse_mlp_step(x[t:t + 1], bundled, layer, mask)
            got = sparse_mlp.step(x[t:t + 1], mlp, "fused")
            np.testing.assert_allclose(got, want, rtol=tol.rtol, atol=tol.atol * np.abs(want).max(),
                                       err_msg=f"d={d} n={n} keep={keep} {router} {prior} {select} {dtype} t={t}")
            count += 1
    return count


def check_blocks(device: str) -> int:
    """triton_step directly, its block sizes varied (k not a multiple of BLOCK_K, d of BLOCK_D), one kernel and the
    split design (split 1, 3, 8: more shares than blocks of neurons too), both activations (gelu_tanh: the kernels
    support it; dn.runtime.sparse_mlp routes GeGLU layers elsewhere until ops passes act)."""
    from dn_torch import kernels

    rng = np.random.default_rng(3)
    count = 0
    for (d, n, k, block_k, block_d, split), act in itertools.product(
            ((96, 50, 17, 16, 64, 0), (160, 64, 33, 8, 128, 0), (64, 40, 40, 64, 32, 0), (200, 30, 5, 4, 256, 0),
             (96, 50, 17, 4, 32, 3), (200, 64, 40, 16, 64, 1), (64, 40, 7, 8, 128, 8)), activations.NAMES):
        b = rng.standard_normal((n, 3, d)).astype(np.float32) * 0.1
        x = rng.standard_normal((1, d)).astype(np.float32)
        c = (rng.standard_normal(n) * 0.01).astype(np.float32)
        y0 = (b[:, 2].T @ c).astype(np.float32)
        idx = np.sort(rng.choice(n, k, replace=False))
        layer = ref.LayerSparse(k, np.zeros((d, 1), np.float32), np.zeros((1, 2 * n), np.float32), c, y0, act=act)
        mask = np.zeros((1, n), bool)
        mask[0, idx] = True
        want = ref.sparse_mlp_step(x, b, layer, mask)
        tt = lambda a: torch.as_tensor(a, device=device)
        got = kernels.triton_step(tt(x), tt(b), tt(idx), tt(c), tt(y0), block_k=block_k, block_d=block_d,
                           act=act, split=split)
        np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-5, atol=1e-5 * np.abs(want).max(),
                                   err_msg=f"d={d} n={n} k={k} blocks {block_k}x{block_d} split {split} {act}")
        count += 1
    return count


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton not installed")


@needs_triton
def test_sparse_kernel_in_the_interpreter():
    assert_runs_in_triton_interpreter(__file__)


@pytest.mark.gpu
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("seed", range(3))
def test_sparse_kernel_cuda(seed):
    check_sparse("cuda", seed)
    check_blocks("cuda")


if __name__ == "__main__":  # run by test_sparse_kernel_in_the_interpreter, or by hand on a GPU machine
    dev = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    print(f"sparse steps {check_sparse(dev)}, block cases {check_blocks(dev)}")
    print("ok")
