import numpy as np
import pytest

from parity.run import compare, rel_err, run_parity


def _obs(logits, greedy, hidden):
    return {"logits": logits, "greedy": greedy, "hidden": hidden}


def test_compare_flags_a_breach_and_the_first_divergent_layer():
    rng = np.random.default_rng(0)
    logits = [rng.normal(size=(20, 50)).astype(np.float32) for _ in range(4)]
    hidden = [rng.normal(size=(20, 8)).astype(np.float32) for _ in range(5)]
    same = compare(_obs(logits, [1, 2, 3], hidden), _obs(logits, [1, 2, 3], hidden), "float32")
    assert same["passed"] and same["max_rel_err"] == 0 and same["first_divergent_layer"] is None
    bent = [h.copy() for h in hidden]
    bent[3] += 0.01
    off = [x + 1e-2 * np.abs(x).max(-1, keepdims=True) for x in logits]
    bad = compare(_obs(logits, [1, 2, 3], hidden), _obs(off, [1, 2, 4], bent), "float32")
    assert not bad["passed"] and bad["first_divergent_layer"] == 3
    assert bad["greedy_agreement"] == pytest.approx(2 / 3)
    assert bad["max_rel_err"] == pytest.approx(1e-2, rel=1e-3)


def test_rel_err_is_relative_to_the_reference_scale():
    ref = np.array([[1.0, -4.0]])
    assert rel_err(ref, ref + [[0.0, 0.4]])[0] == pytest.approx(0.1)


def test_parity_default_model_float32():
    pytest.importorskip("mlx_lm")
    r = run_parity(None, ["mlx", "torch"], "float32", 64)
    assert r["passed"], r
    assert r["positions_compared"] >= 64 and r["tokens_compared"] == 64
    assert r["greedy_agreement"] == 1.0 and r["max_rel_err"] <= 1e-4
    assert set(r["backends"]) == {"mlx", "torch"}
