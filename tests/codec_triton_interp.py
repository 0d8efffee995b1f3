"""Run by test_codec_torch.py with TRITON_INTERPRET=1: the Triton kernels on CPU tensors, small sizes."""

import numpy as np
import torch

from dn.formats import lossless as codec
from dn_torch import _triton_codec
from dn_torch import codec as tc


def main():
    rng = np.random.default_rng(0)
    for dtype in codec.DTYPES:
        encs = {f"t{i}": codec.encode(rng.integers(0, 0x10000, n).astype(np.uint16), dtype, lanes=32, steps=12)
                for i, n in enumerate([1000, 5, 900])}
        p = codec.pack(encs)
        out = torch.empty(p.n, dtype=torch.int16)
        tc._decode_triton(tc.PackedLayer(p), out)
        assert np.array_equal(out.numpy().view(np.uint16), codec.decode_pack(p)), dtype
    for shape, batch in [((6, 256), 1), ((5, 384), 3)]:
        w = (torch.randn(shape) * 0.05).to(torch.bfloat16)
        enc = codec.encode(w.view(torch.int16).numpy().view(np.uint16), "bfloat16", lanes=32, steps=20)
        x = torch.randn(batch, shape[1]).to(torch.bfloat16)
        y = _triton_codec.matvec(tc.PackedLayer(codec.pack({"": enc})), x, shape).float()
        ref = x.float() @ w.float().T
        assert torch.allclose(y, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item()), (shape, batch)
    print("ok")


if __name__ == "__main__":
    main()
