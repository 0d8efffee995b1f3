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


def dn_main(capsys, *args):
    """The CLI in-process, as a SimpleNamespace(returncode, stdout, stderr) like run_dn's."""
    from types import SimpleNamespace

    from dn import cli

    try:
        rc = cli.main(list(args))
    except SystemExit as e:  # argparse
        rc = e.code
    out = capsys.readouterr()
    return SimpleNamespace(returncode=rc, stdout=out.out, stderr=out.err)


def test_help_lists_version_and_shows_defaults(capsys):
    top = dn_main(capsys, "--help")
    assert top.returncode == 0 and "--version" in top.stdout and "chat" in top.stdout
    proc = dn_main(capsys, "generate", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for shown in ("(default: 128)", "(default: auto)", "(default: 1.0)", "--top-k", "--max-kv-size", "--kv-bits",
                  "--system-prompt", "bfloat16 on Metal and CUDA; on a CPU the dtype", "--dense"):
        assert shown in text, shown


def test_dtype_auto_is_bfloat16_where_native_and_where_the_cpu_kernels_need_it(tiny_spec_pair):
    from types import SimpleNamespace

    from dn.runtime import loader

    dense, affine = tiny_spec_pair

    def backend(device, cpu_dtypes):
        return SimpleNamespace(device_name=lambda: device, ops=SimpleNamespace(CPU_DTYPES=cpu_dtypes))

    for device, dtype in (("cuda:NVIDIA H200", "bfloat16"), ("metal:Apple M3", "bfloat16"), ("gpu", "bfloat16")):
        assert loader.compute_dtype(backend(device, {}), dense) == dtype
    for device in ("cpu", "mps"):
        assert loader.compute_dtype(backend(device, {"affine": "bfloat16"}), dense) == "float32"
        assert loader.compute_dtype(backend(device, {"affine": "bfloat16"}), affine) == "bfloat16"  # torch's int4
        assert loader.compute_dtype(backend(device, {}), affine) == "float32"  # MLX's CPU kernels


def test_dtype_auto_on_a_quantized_folder_is_what_the_backend_declares(tiny_spec_pair):
    from dn.runtime import backend as backends
    from dn.runtime import loader

    _, affine = tiny_spec_pair
    assert loader.compute_dtype(backends.get("torch"), affine) == "bfloat16"


@pytest.fixture
def tiny_spec_pair(tmp_path):
    """A dense and an affine spec of the same tiny random model."""
    from test_hub import tiny_source

    from dn.model.spec import load_spec
    from dn.runtime import writer

    src = tiny_source(tmp_path / "dense")
    writer.convert(src, tmp_path / "q", None, None, quant=writer.quantization(4, 32))
    return load_spec(src), load_spec(tmp_path / "q")


def test_eval_text_shorter_than_ctx(capsys, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    assert_one_line_error(dn_main(capsys, "eval", "--text", str(short), "--ctx", "64"),
                          "fewer than one window of --ctx 64")


def test_eval_json_names_the_default_model(capsys, tmp_path, eval_text):
    out = tmp_path / "e.json"
    proc = dn_main(capsys, "eval", "--backend", "torch", "--text", str(eval_text), "--max-tokens", "64",
                   "--ctx", "32", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["model"] == "default"
    assert "\r" not in proc.stderr  # no progress bar when stderr is not a terminal


def test_progress_bar_only_on_a_terminal(monkeypatch):
    import io
    import sys

    from dn import cli

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, shown in ((io.StringIO(), False), (Terminal(), True)):
        monkeypatch.setattr(sys, "stderr", stream)
        with cli.progress(10, "dn eval", "tok") as bar:
            bar.update(10)
        assert ("dn eval" in stream.getvalue()) == shown


def test_unreachable_hub_without_cache(tmp_path):
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "0"}
    assert_one_line_error(dn("generate", "--model", "nobody/no-such-model", env=env), "could not be reached")


def test_folder_from_a_newer_dn(capsys, tmp_path, default_model_dir):
    from dn.model.spec import SPEC_FILE, SPEC_VERSION, load_spec

    folder = tmp_path / "newer"
    folder.mkdir()
    for f in default_model_dir.iterdir():
        (folder / f.name).symlink_to(f)
    spec = load_spec(default_model_dir).to_json()
    (folder / SPEC_FILE).write_text(json.dumps({**spec, "version": SPEC_VERSION + 1}))
    assert_one_line_error(dn_main(capsys, "generate", "--model", str(folder)), "converted by a newer dn")


def test_gguf_cache_key_is_the_content_not_the_path(tmp_path):
    import os

    from dn.model.sources import FINGERPRINT_SPAN, _fingerprint

    data = bytearray(os.urandom(3 * FINGERPRINT_SPAN))
    a, b = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    for path in (a, b):
        path.parent.mkdir()
        path.write_bytes(data)
    os.utime(b, ns=(0, 0))
    assert _fingerprint(a) == _fingerprint(b)
    data[-1] ^= 1
    b.write_bytes(data)
    assert _fingerprint(a) != _fingerprint(b)


def test_converted_folders_get_mkdirs_mode(tmp_path, monkeypatch):
    import os
    import stat

    from dn.model import gguf
    from dn.model.sources import convert_gguf

    def fake_convert(path, out, progress=True, dense=False):
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(gguf, "convert", fake_convert)
    monkeypatch.setenv("DN_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF" + bytes(64))
    mask = os.umask(0o022)
    try:
        target = convert_gguf(src, "m", progress=False)
    finally:
        os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
