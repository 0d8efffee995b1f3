"""The Python API (dn.load, dn.generate, dn.stream_generate, dn.convert): the same text as `dn generate`, the
stream joining to it, a converted folder that loads; and `import dn` stays cheap."""

import subprocess
import sys

import pytest
from test_hub import tiny_source

import dn
from dn import cli
from dn.core.errors import DnError
from dn.model.spec import load_spec
from dn.runtime import loader

PROMPT = "What is the capital of France?"


def _cli_text(capsys, *args) -> str:
    """What `dn generate ... -q` prints, less the newline it ends with."""
    capsys.readouterr()
    assert cli.main(["generate", *args, "-q"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n")
    return out[:-1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_source(tmp_path_factory.mktemp("api") / "src")


def test_import_dn_is_cheap_and_the_api_names_win():
    proc = subprocess.run([sys.executable, "-c", "import sys, dn; print(sorted(m for m in ('dn.api', 'numpy', "
                           "'dn.runtime') if m in sys.modules))"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
    import dn.convert  # the verb modules of the same names must not rebind dn.convert, dn.generate
    import dn.generate
    from dn import api

    assert dn.generate is api.generate and dn.convert is api.convert and dn.load is api.load
    assert dn.stream_generate is api.stream_generate and dn.__version__
    with pytest.raises(AttributeError):
        _ = dn.no_such_name


def test_tiny_generate_matches_the_cli_and_the_stream(tiny, backend_name, capsys):
    loaded = dn.load(str(tiny), backend=backend_name)
    assert loaded.dtype == loader.compute_dtype(loaded.backend, loaded.spec)
    text = dn.generate(loaded, PROMPT, max_tokens=12)
    assert text == _cli_text(capsys, "--model", str(tiny), "--backend", backend_name, "--prompt", PROMPT,
                             "--max-tokens", "12")
    responses = list(dn.stream_generate(loaded, PROMPT, max_tokens=12))
    assert "".join(r.text for r in responses) == text
    last = responses[-1]
    assert last.finish_reason in ("stop", "length") and all(r.finish_reason is None for r in responses[:-1])
    assert [r.generation_tokens for r in responses] == list(range(1, len(responses) + 1))
    assert last.prompt_tokens > 0 and last.prompt_tps > 0 and last.peak_memory > 0
    ids = loaded.tokenizer.encode(PROMPT)
    assert dn.generate(loaded, ids, max_tokens=12) == _cli_text(
        capsys, "--model", str(tiny), "--backend", backend_name, "--prompt", PROMPT, "--max-tokens", "12", "--raw")
    sampled = dict(max_tokens=8, temp=0.8, top_k=20, seed=3)
    assert dn.generate(loaded, PROMPT, **sampled) == dn.generate(loaded, PROMPT, **sampled)


def test_convert_writes_a_folder_that_loads(tiny, tmp_path):
    out = dn.convert(str(tiny), tmp_path / "q4", quantize=True, q_group_size=32)
    assert out == tmp_path / "q4" and load_spec(out).quant["group_size"] == 32
    loaded = dn.load(str(out), backend="torch")
    assert loaded.spec.quant and dn.generate(loaded, PROMPT, max_tokens=4)
    with pytest.raises(DnError, match="already exists"):
        dn.convert(str(tiny), out)


@pytest.mark.slow
def test_default_model_greedy_matches_dn_generate(capsys):
    loaded = dn.load(backend="torch")
    text = dn.generate(loaded, PROMPT, max_tokens=24)
    assert "Paris" in text
    assert text == _cli_text(capsys, "--backend", "torch", "--prompt", PROMPT, "--max-tokens", "24")
    assert "".join(r.text for r in dn.stream_generate(loaded, PROMPT, max_tokens=24)) == text
