import math

from dn.footprint import accounted, kv_cache_bytes


def test_accounted_roles_add_up(default_spec):
    acc = accounted(default_spec, "bfloat16", 1024)
    assert sum(acc["roles"].values()) == acc["dense_weight_bytes"]
    assert acc["dense_weight_bytes"] == 2 * sum(math.prod(t.shape) for t in default_spec.tensors)
    assert acc["roles"]["lm_head"] == 0 and acc["tied_embeddings"]
    assert acc["roles"]["embeddings"] == 2 * 49152 * 576


def test_kv_cache_formula(default_spec):
    # 2 (k and v) x 30 layers x 3 kv heads x 64 dims x ctx x 4 bytes
    assert kv_cache_bytes(default_spec, 100, "float32") == 2 * 30 * 3 * 64 * 100 * 4
