"""mlx-lm folders load as they are (issue 20, item 3): the default model converted offline by mlx-lm itself (plain 4-bit
at groups of 64 and 32, and the mixed_3_6 recipe, whose per-layer entries have a null group size) gives dn on MLX
mlx-lm's logits and greedy tokens, and dn on torch the same at float32; a per-layer entry missing gives one line."""

import json
import os
import shutil

import numpy as np
import pytest
from helpers import assert_one_line_error, run_dn

import dn
from dn.core.tolerances import KERNEL, PARITY, QUANT

pytest.importorskip("mlx_lm")
mx = pytest.importorskip("mlx.core")

RECIPES = {"q4g64": {"q_bits": 4, "q_group_size": 64}, "q4g32": {"q_bits": 4, "q_group_size": 32},
           "mixed_3_6": {"quant_predicate": "mixed_3_6"}}
TOKENS = 6


@pytest.fixture(scope="session")
def mlx_lm_folder(tmp_path_factory, default_model_dir):
    """recipe -> the folder `mlx_lm.convert -q` writes from the dense default model, converted once a session."""
    from mlx_lm.convert import convert

    made = {}

    def get(recipe):
        if recipe not in made:
            out = tmp_path_factory.mktemp("mlx_lm") / recipe
            convert(str(default_model_dir), str(out), quantize=True, **RECIPES[recipe])
            made[recipe] = out
        return made[recipe]
    return get


@pytest.fixture(scope="session")
def prompt(tokenizer):
    return tokenizer.encode("The capital of France is")


@pytest.fixture(scope="session")
def mlx_lm_run(mlx_lm_folder, prompt):
    """recipe -> (mlx-lm's logits over prompt + its greedy tokens, the greedy tokens): mlx_lm.load's model cast to
    float32 (at bf16 on a CPU mlx's kernels sum in bf16, which dn_mlx.quant does not: no common ground there)."""
    import mlx_lm
    from mlx_lm.generate import stream_generate

    runs = {}

    def get(recipe):
        if recipe not in runs:
            model, tok = mlx_lm.load(str(mlx_lm_folder(recipe)))
            model.set_dtype(mx.float32)
            greedy = [r.token for r in stream_generate(model, tok, prompt, max_tokens=TOKENS)]
            runs[recipe] = np.array(model(mx.array([prompt + greedy])))[0], greedy
        return runs[recipe]
    return get


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mlx_gives_mlx_lm_logits_and_tokens(recipe, dtype, mlx_lm_folder, mlx_lm_run, prompt):
    """float32: mlx-lm's logits; bfloat16: within bf16 noise of them; the same greedy tokens at both."""
    want, greedy = mlx_lm_run(recipe)
    loaded = dn.load(str(mlx_lm_folder(recipe)), backend="mlx", dtype=dtype)
    got = loaded.backend.logits(loaded.model, np.array([prompt + greedy]))[0]
    assert _rel(got, want) <= (KERNEL["float32"].rtol if dtype == "float32" else QUANT[dtype])
    assert [r.token for r in dn.stream_generate(loaded, prompt, max_tokens=TOKENS)] == greedy


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_torch_gives_mlx_lm_logits_and_tokens(recipe, mlx_lm_folder, mlx_lm_run, prompt):
    """At float32 (torch's quantized float32 decode is slow on a CPU: greedy checked teacher-forced, one forward)."""
    pytest.importorskip("torch")
    want, greedy = mlx_lm_run(recipe)
    loaded = dn.load(str(mlx_lm_folder(recipe)), backend="torch", dtype="float32")
    got = loaded.backend.logits(loaded.model, np.array([prompt + greedy]))[0]
    assert _rel(got, want) <= PARITY["float32"].max_rel_err
    assert got[len(prompt) - 1:-1].argmax(-1).tolist() == greedy


def test_mixed_folder_missing_an_entry_gives_one_line(mlx_lm_folder, tmp_path):
    """mlx-lm's loader rule: a module is quantized iff its .scales are stored, at its own entry's bits and group
    size, else the global ones; a 6-bit down_proj without its entry fits neither, so dn names it (mlx-lm 0.32
    guesses the parameters from the shapes instead; older ones fail on a shape mismatch)."""
    src = mlx_lm_folder("mixed_3_6")
    folder = tmp_path / "missing"
    shutil.copytree(src, folder, copy_function=os.symlink)
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["quantization"]["model.layers.0.mlp.down_proj"]["bits"] == 6 and cfg["quantization"]["bits"] == 4
    for key in ("quantization", "quantization_config"):
        del cfg[key]["model.layers.0.mlp.down_proj"]
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps(cfg))
    proc = run_dn("generate", "--model", str(folder), "--backend", "mlx", "--prompt", "hi", "--max-tokens", "1")
    assert_one_line_error(proc, "no entry for model.layers.0.mlp.down_proj, stored at 6 bits, groups of 64")
