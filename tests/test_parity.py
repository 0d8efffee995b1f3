import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_hub import tiny_source

import parity.run as suite
from dn import parity as dn_parity
from dn.core.tolerances import ParityTol
from dn.parity import BREACH, compare, rel_err, run_parity

ROOT = Path(__file__).resolve().parent.parent


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


def test_suite_entry_is_dn_parity():
    """`python -m parity.run` runs dn's own verb: dn never imports the parity package."""
    assert suite.main is dn_parity.main and suite.run_parity is run_parity


def test_a_breach_exits_with_its_own_code(tmp_path, monkeypatch, capsys):
    """A threshold breached: exit BREACH (3), the JSON written with every field; nox accepts it for bf16 only."""
    pytest.importorskip("mlx_lm")
    src = tiny_source(tmp_path / "src")
    monkeypatch.setitem(dn_parity.PARITY, "float32", ParityTol(max_rel_err=-1.0, greedy_agreement=1.0,
                                                            hidden_rel_err=-1.0))
    out = tmp_path / "parity.json"
    rc = dn_parity.main(["--model", str(src), "--backends", "torch,mlx", "--tokens", "4", "--json", str(out)])
    assert rc == BREACH == 3
    assert capsys.readouterr().out.strip().endswith("FAILED")
    r = json.loads(out.read_text())
    assert r["passed"] is False and r["first_divergent_layer"] == 0 and r["tokens_compared"] == 4
    assert {"max_rel_err", "mean_rel_err", "greedy_agreement", "positions_compared", "layer_rel_err", "thresholds",
            "route_agreement", "model", "dtype", "reference", "sparse", "backends"} <= set(r)
    assert "success_codes=[0, 3]" in (ROOT / "noxfile.py").read_text()


def test_a_crash_is_not_a_breach(tmp_path):
    """An exception inside a backend call exits 1 with its traceback, never 0 or BREACH: CI fails on it."""
    src = tiny_source(tmp_path / "src")
    code = ("import sys\nimport dn_torch\nfrom dn import cli\n"
            "def boom(*a, **k):\n    raise RuntimeError('injected')\n"
            "dn_torch.logits = boom\nsys.exit(cli.main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "parity", "--model", str(src), "--backends", "torch,mlx",
                           "--tokens", "4"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode not in (0, BREACH), proc.stdout
    assert "RuntimeError: injected" in proc.stderr and "Traceback" in proc.stderr
