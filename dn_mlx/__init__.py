"""dn's MLX backend: mlx-lm models, Metal kernels on Apple silicon. The package is a dn.runtime.backend.Backend;
its names come from the modules that define them."""

from dn_mlx import ops as ops
from dn_mlx import pipeline as pipeline
from dn_mlx import resident as resident
from dn_mlx.model import NAME as NAME
from dn_mlx.model import device_name as device_name
from dn_mlx.model import free as free
from dn_mlx.model import hidden_states as hidden_states
from dn_mlx.model import import_model_code as import_model_code
from dn_mlx.model import is_available as is_available
from dn_mlx.model import load as load
from dn_mlx.model import logits as logits
from dn_mlx.model import make_cache as make_cache
from dn_mlx.model import memory_stats as memory_stats
from dn_mlx.model import token_nll as token_nll
from dn_mlx.sparse import collect_mlp_inputs as collect_mlp_inputs
from dn_mlx.sparse import install_sparse as install_sparse
from dn_mlx.sparse import make_sparse_mlp as make_sparse_mlp
from dn_mlx.sparse import mlp_weights as mlp_weights
