"""dn's MLX backend: mlx-lm models, Metal kernels on Apple silicon."""

from dn_mlx.model import (
    NAME,
    device_name,
    free,
    hidden_states,
    import_model_code,
    is_available,
    load,
    logits,
    make_cache,
    memory_stats,
    token_nll,
)
from dn_mlx.sparse import collect_mlp_inputs, mlp_weights
from dn_mlx.sparse import install as install_sparse
from dn_mlx.sparse import make_mlp as make_sparse_mlp


def resident_module():
    """dn_mlx.resident: the block layout and ops dn.runtime.residency runs on."""
    from dn_mlx import resident

    return resident


__all__ = ["NAME", "resident_module", "collect_mlp_inputs", "install_sparse", "make_sparse_mlp", "mlp_weights",
           "device_name", "free", "hidden_states", "import_model_code", "is_available", "load", "logits",
           "make_cache", "memory_stats", "token_nll"]
