"""dn's PyTorch backend: transformers models, Triton kernels on CUDA/ROCm, C kernels on the CPU. The package is a
dn.runtime.backend.Backend; its names come from the modules that define them."""

from dn_torch import ops as ops
from dn_torch import pipeline as pipeline
from dn_torch import resident as resident
from dn_torch.model import NAME as NAME
from dn_torch.model import device_name as device_name
from dn_torch.model import free as free
from dn_torch.model import hidden_states as hidden_states
from dn_torch.model import import_model_code as import_model_code
from dn_torch.model import is_available as is_available
from dn_torch.model import load as load
from dn_torch.model import logits as logits
from dn_torch.model import make_cache as make_cache
from dn_torch.model import memory_stats as memory_stats
from dn_torch.model import token_nll as token_nll
from dn_torch.sparse import collect_mlp_inputs as collect_mlp_inputs
from dn_torch.sparse import install_sparse as install_sparse
from dn_torch.sparse import make_sparse_mlp as make_sparse_mlp
from dn_torch.sparse import mlp_weights as mlp_weights
