"""Bad input through the real `dn` entry point: one line on stderr, non-zero exit, no traceback."""

import json

import pytest
from helpers import assert_one_line_error
from helpers import run_dn as dn


@pytest.mark.parametrize(("args", "needle"), [
    (["generate", "--max-tokens", "0"], "expected a positive integer"),
    (["generate", "--temp", "-1"], "finite number >= 0"),
    (["generate", "--temp", "nan"], "finite number >= 0"),
    (["generate", "--backend", "jax"], "invalid choice"),
    (["eval", "--dtype", "int3", "--text", "x"], "invalid choice"),
    (["eval", "--ctx", "abc", "--text", "x"], "expected a positive integer"),
    (["parity", "--backends", "torch"], "two different backends"),
    (["convert", "--out", "/tmp/dn-never", "--sparsity", "0"], "sparsity must be in (0, 1)"),
    (["frobnicate"], "unknown verb"),
])
def test_invalid_flags(args, needle):
    assert_one_line_error(dn(*args), needle)


def test_missing_and_empty_text(tmp_path):
    assert_one_line_error(dn("eval", "--text", str(tmp_path / "none.txt")), "no such text file")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert_one_line_error(dn("eval", "--text", str(empty)), "is empty")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    assert_one_line_error(dn("eval", "--text", str(binary)), "not UTF-8")
    assert_one_line_error(dn("eval", env={"DN_EVAL_TEXT": ""}), "no text file given")


def test_unknown_model_and_corrupt_files(tmp_path):
    assert_one_line_error(dn("generate", "--model", str(tmp_path / "nope")), "no such model")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 100)
    assert_one_line_error(dn("generate", "--model", str(bad), env={"DN_CACHE": str(tmp_path / "c")}), "GGUF")
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    assert_one_line_error(dn("footprint", "--model", str(folder)), "unreadable config")


def test_offline_hub_without_cache(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    assert_one_line_error(dn("generate", "--model", "nobody/no-such-model", env=env), "HF_HUB_OFFLINE=1")


def test_footprint_json_without_loading(tmp_path, default_model_dir):
    out = tmp_path / "fp.json"
    proc = dn("footprint", "--model", str(default_model_dir), "--no-measure", "--dtype", "bfloat16",
              "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["accounted"]["dense_weight_bytes"] == 2 * 134515008


def test_convert_refuses_existing_output(tmp_path):
    assert_one_line_error(dn("convert", "--out", str(tmp_path)), "already exists")
