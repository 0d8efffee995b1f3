"""The comforts a newcomer missed (issue 21, item 5): the chat REPL's commands, history and Ctrl-C, `dn cache`, one
cache folder per GGUF however it is named, convert -q's bits per weight, what codec stats counted, "dn: interrupted"
on its own line, `--prompt ""`, the device variables, and README agreeing with --help."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_one_line_error, run_dn
from test_cli import dn_main  # the CLI in-process: returncode, stdout, stderr

from dn import chat
from dn.core import tensors
from dn.core.errors import DnError
from dn.core.files import cache_dir

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _cache_env(tmp_path) -> dict:
    """A fresh $DN_CACHE whose models/ and native/ are the real cache's, so a subprocess finds the default model's
    folder (and built kernels) there but writes its own files (the chat history) into tmp_path."""
    real, fresh = cache_dir(), tmp_path / "cache"
    fresh.mkdir()
    for name in ("models", "native"):
        (real / name).mkdir(parents=True, exist_ok=True)
        (fresh / name).symlink_to(real / name)
    return {**os.environ, "DN_CACHE": str(fresh), "PYTHONUNBUFFERED": "1"}


def _read_until(fd: int, pattern: str, timeout: float = 300) -> str:
    """What fd gives until pattern appears in it (the process is then mid-run)."""
    got, end = b"", time.monotonic() + timeout
    while pattern.encode() not in got:
        ready, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))  # bounded, never a hang
        assert ready, f"no {pattern!r} in {got[-500:]!r} after {timeout} s"
        chunk = os.read(fd, 4096)
        assert chunk, f"output ended before {pattern!r}: {got[-500:]!r}"
        got += chunk
    return got.decode(errors="replace")


def _default_sigint():
    """In a child before exec: SIGINT as a terminal's Ctrl-C delivers it. A suite started in the background by a
    shell without job control ignores SIGINT, and an ignored signal stays ignored across exec."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# --- the chat REPL ---

def test_chat_commands_say_what_they_did(capsys, monkeypatch, backend_name):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("/help\n/reset\n/bogus\n/exit\n"))
    r = dn_main(capsys, "chat", "--backend", backend_name, "-q")
    assert r.returncode == 0 and r.stdout == "", r.stderr
    for command, what in chat.COMMANDS.items():
        assert f"{command}" in r.stderr and what in r.stderr
    assert "conversation reset" in r.stderr and "unknown command /bogus" in r.stderr


@pytest.mark.slow  # a fresh process loads the model
def test_ctrl_c_mid_reply_stops_the_reply_not_the_chat(backend_name, tokenizer):
    """SIGINT while a long reply streams: the chat goes on to the next line, and the stopped turn is dropped (the
    next turn is prefilled over its own message only)."""
    proc = subprocess.Popen([sys.executable, "-m", "dn.cli", "chat", "--backend", backend_name, "--dtype", "float32",
                             "--max-tokens", "3000"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=_default_sigint)
    try:
        proc.stdin.write(b"Write a very long story about a dragon.\n")
        proc.stdin.flush()
        first = _read_until(proc.stdout.fileno(), " ")  # the reply has started
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(b"Say hi.\n/exit\n", timeout=300)
    finally:
        proc.kill()
    err = err.decode()
    assert proc.returncode == 0, err
    assert "reply stopped" in err and "Traceback" not in err and "interrupted" not in err
    lines = (first + out.decode()).splitlines()
    assert len(lines) >= 2 and lines[1].strip(), lines  # the stopped reply's line, then the next turn's reply
    prefilled = [int(n) for n in re.findall(r"prompt (\d+) tokens", err)]
    fresh = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}]),
                             add_special_tokens=False)
    assert prefilled == [len(fresh)], err  # one finished reply, over "Say hi." alone


@pytest.mark.slow  # a fresh process loads the model
def test_chat_on_a_terminal_keeps_history_and_ends_at_ctrl_c(tmp_path):
    """On a terminal (a pty): a line typed goes into the history file in the dn cache; Ctrl-C at the prompt ends
    the chat with exit code 0, no traceback."""
    pty = pytest.importorskip("pty")
    if chat.readline is None:
        pytest.skip("this Python has no readline")
    env = _cache_env(tmp_path)
    pid, fd = pty.fork()
    if pid == 0:  # the child: dn chat on the pty
        _default_sigint()
        os.execve(sys.executable, [sys.executable, "-m", "dn.cli", "chat", "--backend", "torch", "-m", "3", "-q"], env)
    try:
        _read_until(fd, ">> ")
        os.write(fd, b"Hello there\r")
        _read_until(fd, ">> ")  # replied, asking again
        os.write(fd, b"\x03")
        text = b""
        while True:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the pty
                break
            if not chunk:
                break
            text += chunk
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert b"Traceback" not in text
    assert "Hello there" in (Path(env["DN_CACHE"]) / "chat_history").read_text()


# --- dn cache ---

def test_cache_ls_and_rm(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DN_CACHE", str(tmp_path / "cache"))
    root = cache_dir()
    (root / "models" / "m-abc-gguf").mkdir(parents=True)
    (root / "models" / "m-abc-gguf" / "model.safetensors").write_bytes(bytes(3000))
    (root / "gguf").mkdir()
    (root / "gguf" / "g.gguf").write_bytes(bytes(500))
    (root / "native").mkdir()
    for k in range(3):
        (root / "native" / f"k{k}.so").write_bytes(bytes(100))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    (root / "models" / "link").symlink_to(outside)

    r = dn_main(capsys, "cache", "ls")
    assert r.returncode == 0
    assert re.search(r"2\.9 KiB\s+models/m-abc-gguf/", r.stdout) and re.search(r"500 B\s+gguf/g.gguf", r.stdout)
    assert re.search(r"300 B\s+native/", r.stdout) and "k0.so" not in r.stdout  # the kernels: one entry
    link = (root / "models" / "link").lstat().st_size  # a link counts as itself, not what it names
    assert r.stdout.splitlines()[0] == f"{root}: {(3800 + link) / 1024:.1f} KiB in 4 entries"

    r = dn_main(capsys, "cache", "rm", "models/m-abc-gguf", "link")
    assert r.returncode == 0 and "removed" in r.stdout and "m-abc-gguf" in r.stdout
    assert not (root / "models" / "m-abc-gguf").exists() and not (root / "models" / "link").exists()
    assert (outside / "keep.txt").read_text() == "keep"  # a link is removed, not followed
    for bad in (["rm", "nope"], ["rm", "../outside"], ["rm"], ["rm", "--all", "gguf"]):
        assert_one_line_error(dn_main(capsys, "cache", *bad), "dn cache rm")
    r = dn_main(capsys, "cache", "rm", "--all")
    assert r.returncode == 0 and "freed 800 B" in r.stdout
    assert [p.name for p in root.iterdir() if any(p.iterdir())] == [] and (outside / "keep.txt").exists()


def test_a_gguf_is_cached_once_named_or_by_path(tmp_path, monkeypatch):
    """The default model, then the same file by its path (and a copy elsewhere): one conversion, one folder."""
    import shutil

    from dn.model import gguf
    from dn.model.sources import default_gguf, resolve_model

    made = []

    def fake_convert(path, out, progress=True, dense=False):
        made.append((path, dense))
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(gguf, "convert", fake_convert)
    monkeypatch.setenv("DN_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "elsewhere" / "renamed.gguf"
    copy.parent.mkdir()
    shutil.copy(default_gguf(), copy)
    first = resolve_model(None)
    assert resolve_model(str(default_gguf())) == first == resolve_model(str(copy))
    assert len(made) == 1
    widened = resolve_model(str(copy), dense=True)  # the widening is another folder, made once too
    assert widened != first and resolve_model(None, dense=True) == widened and len(made) == 2
    assert sorted(p.name for p in (tmp_path / "cache" / "models").iterdir()) == sorted([first.name, widened.name])


# --- convert, codec stats ---

def test_convert_q_prints_bits_per_weight_and_size(tmp_path, capsys, default_model_dir):
    from dn.model.spec import inventory

    out = tmp_path / "q"
    r = dn_main(capsys, "convert", "-q", "--out", str(out))
    assert r.returncode == 0, r.stderr
    bpw = float(re.search(r"^\[INFO\] Quantized model with (\d+\.\d{3}) bits per weight\.$", r.stdout, re.M)[1])
    # 4 bits plus a bf16 scale and bias per 64 weights for matrices, 16 bits for the norms
    infos = inventory(default_model_dir)
    matrices = sum(t.numel for t in infos if len(t.shape) == 2)
    vectors = sum(t.numel for t in infos if len(t.shape) != 2)
    assert bpw == pytest.approx((4.5 * matrices + 16 * vectors) / (matrices + vectors), abs=1.5e-3)
    mib = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    assert f"wrote {out} ({mib:.1f} MiB)" in r.stdout


def test_codec_stats_says_what_it_counted(tmp_path, capsys):
    bf16 = lambda n: tensors.f32_to_bf16(np.random.default_rng(n).normal(size=(64, 64)).astype(np.float32))
    path = tmp_path / "m.safetensors"
    tensors.save({"model.embed_tokens.weight": (bf16(0), "BF16"),
                  "model.layers.0.mlp.up_proj.weight": (bf16(1), "BF16"),
                  "model.layers.1.mlp.up_proj.weight": (bf16(2), "BF16"),
                  "model.layers.0.mlp.up_proj.packed": np.zeros((64, 8), np.uint32)}, path)
    r = dn_main(capsys, "codec", "stats", str(path))
    assert r.returncode == 0, r.stderr
    counted = next(line for line in r.stdout.splitlines() if line.startswith("counted"))
    skipped = next(line for line in r.stdout.splitlines() if line.startswith("skipped"))
    assert counted.endswith(": model.embed_tokens.weight, model.layers.*.mlp.up_proj.weight (x2)"), counted
    assert skipped.endswith(": model.layers.*.mlp.up_proj.packed"), skipped


# --- interrupted, progress, --prompt "" ---

@pytest.mark.slow  # a fresh process loads the model
def test_interrupted_is_a_line_of_its_own(backend_name):
    """SIGINT mid-reply, stdout and stderr on one pipe as on a terminal: the reply's open line is ended first."""
    proc = subprocess.Popen([sys.executable, "-m", "dn.cli", "generate", "--backend", backend_name, "--max-tokens",
                             "3000", "-q", "--prompt", "Write a very long story about a dragon."],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=_default_sigint)
    try:
        first = _read_until(proc.stdout.fileno(), " ")
        proc.send_signal(signal.SIGINT)
        out = first + proc.communicate(timeout=120)[0].decode()
    finally:
        proc.kill()
    assert proc.returncode == 130, out
    assert out.endswith("\ndn: interrupted\n") and "Traceback" not in out, out
    assert out.splitlines()[0].strip()  # the partial reply, on a line of its own before


def test_calibration_status_lines_only_on_a_terminal(capsys, monkeypatch):
    """dn convert --sparsity's per-layer status (a \\r line) stays out of a log: stderr is no terminal here."""
    from dn.formats import sparse
    from dn.runtime import calibrate

    monkeypatch.setattr(sparse, "fit_layer", lambda *a, **k: None)  # the fitting itself is not what is tested
    w = np.zeros((8, 4), np.float32)
    calibrate.fit_model([np.zeros((2, 4), np.float32)] * 2, lambda i: (w, w, w.T), 0.5, "none", 2)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("prompt", ["", "  \n"])
def test_empty_prompt_is_refused_like_empty_stdin(capsys, prompt):
    r = dn_main(capsys, "generate", "--prompt", prompt)
    assert r.returncode == 2 and r.stdout == "" and r.stderr == "dn: error: --prompt is empty\n"


# --- device variables ---

@pytest.mark.parametrize(("name", "var", "value", "needle"), [
    ("torch", "DN_TORCH_DEVICE", "bogus", "expected cpu, cuda, cuda:N or mps"),
    ("torch", "DN_TORCH_DEVICE", "cuda:99", "DN_TORCH_DEVICE=cuda:99: "),
    ("mlx", "DN_MLX_DEVICE", "bogus", "expected cpu or gpu"),
])
def test_device_variables_are_checked_in_one_line(name, var, value, needle):
    pytest.importorskip(f"dn_{name}")
    assert_one_line_error(run_dn("generate", "--backend", name, "-m", "1", env={var: value}), needle)


def test_device_variables_name_a_missing_device(backend):
    """A device this machine lacks is one line too (here: a GPU where there is none)."""
    if backend.NAME == "torch":
        import torch

        from dn_torch.ops import _pinned as pinned

        assert pinned("cpu").type == "cpu"
        with pytest.raises(DnError, match="DN_TORCH_DEVICE=cuda:"):
            pinned(f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}")
    else:
        import mlx.core as mx

        from dn_mlx.model import _pin_device as pin_device

        before = mx.default_device()
        try:
            pin_device("gpu")
        except DnError as e:
            assert re.match(r"DN_MLX_DEVICE=gpu: .* has no gpu", str(e))
        else:
            mx.set_default_device(before)
            pytest.skip("MLX has a GPU here")


# --- README and --help agree ---

def _readme_row(command: str) -> str:
    return next(line for line in README.splitlines() if line.startswith(f"| `{command}"))


def _flags(capsys, *verb) -> list[str]:
    r = dn_main(capsys, *verb, "--help")
    return sorted(set(re.findall(r"^\s+(?:-\w, )?(--[\w-]+)", r.stdout, re.M)) - {"--help"})


@pytest.mark.parametrize("verb", [("parity",), ("convert",), ("codec", "stats")])
def test_readme_names_every_flag(capsys, verb):
    row = _readme_row("dn " + " ".join(verb))
    assert [f for f in _flags(capsys, *verb) if f not in row] == []


def test_readme_states_the_defaults_help_shows(capsys):
    from dn.bench.configs import DEFAULT_CONFIGS
    from dn.parity import setup_arg_parser

    row = _readme_row("dn parity")
    parity = setup_arg_parser().parse_args([])
    assert f"`--backends {parity.backends}`" in row and f"`--dtype {parity.dtype}`" in row
    assert f"`--tokens {parity.tokens}`" in row
    assert "(default: float32)" in dn_main(capsys, "parity", "--help").stdout  # a flag without help shows it too
    bench = _readme_row("dn bench")
    assert f"`--configs` defaults to `{DEFAULT_CONFIGS}`" in bench
    assert " --json OUT " in bench and "(required)" in dn_main(capsys, "bench", "--help").stdout
    assert "[--json OUT]" in _readme_row("dn codec stats")
    assert "python3 -m venv .venv" in README and "python3 -m nox -s tests" in README  # the two set-up commands
