"""dn's PyTorch backend: transformers models, Triton kernels on CUDA/ROCm."""

from dn_torch.model import (
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
from dn_torch.sparse import collect_mlp_inputs, mlp_weights
from dn_torch.sparse import install as install_sparse
from dn_torch.sparse import make_mlp as make_sparse_mlp


def resident_module():
    """dn_torch.resident: the block layout and ops dn.runtime.residency runs on."""
    from dn_torch import resident

    return resident


__all__ = ["NAME", "resident_module", "collect_mlp_inputs", "install_sparse", "make_sparse_mlp", "mlp_weights",
           "device_name", "free", "hidden_states", "import_model_code", "is_available", "load", "logits",
           "make_cache", "memory_stats", "token_nll"]
