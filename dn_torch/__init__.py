"""dn's PyTorch backend: transformers models, Triton kernels on CUDA/ROCm."""

from dn_torch.model import (
                            NAME,
                            device_name,
                            free,
                            hidden_states,
                            is_available,
                            load,
                            logits,
                            make_cache,
                            peak_memory_bytes,
                            reset_peak_memory,
                            resident_weight_bytes,
                            token_nll,
)

__all__ = ["NAME", "device_name", "free", "hidden_states", "is_available", "load", "logits", "make_cache",
           "peak_memory_bytes", "reset_peak_memory", "resident_weight_bytes", "token_nll"]
