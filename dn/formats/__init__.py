"""Weight formats, each one object with the same small interface (torchao's tensors with a layout of their own):

  name, scratch      the format's name in a store entry (dn.model.store); scratch: held coded and decoded at use
                     into one buffer, the largest such weight at the compute dtype, shared by all of them
  nbytes(shape, dtype_bytes, **params)   bytes held for a weight of that dense shape at a compute dtype of
                     dtype_bytes: the one accounting (dn.model.store, dn.runtime.residency)
  from_stored(f, name, **params)   read from a dn.core.tensors.File straight into its runtime layout
  dequantize()       float32 values: the plain path
  matmul(x)          x @ W.T in float32: the numpy reference the backends' kernels are checked against
  rows(idx)          float32 rows W[idx]: the sparse MLP's kept neurons
Backends build their framework modules from these objects or from the arrays dn.core.tensors hands them.
"""

from __future__ import annotations

from dn.core.errors import DnError
from dn.formats.dense import Dense
from dn.formats.fixed4 import Lossless
from dn.formats.gguf_blocks import GGUFBlocks
from dn.formats.planes import Planes
from dn.formats.quant import Affine

FORMATS = {f.name: f for f in (Dense, Affine, Lossless, Planes, GGUFBlocks)}


def get(name: str):
    """The format object of that name."""
    if name not in FORMATS:
        raise DnError(f"unknown weight format {name!r} (dn holds {', '.join(FORMATS)})")
    return FORMATS[name]
