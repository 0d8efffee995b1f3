"""Model sources: folders, GGUF files, Hub ids through the cache, and the errors for each."""

import shutil
from pathlib import Path

import pytest

from dn.core.errors import DnError
from dn.model import gguf as dn_gguf
from dn.model.sources import cache_dir, convert_gguf, default_gguf, resolve_model
from dn.model.spec import load_spec


def _fake_hub_cache(root: Path, repo: str, src: Path) -> None:
    """The layout huggingface_hub keeps: refs/main names a snapshot folder of files."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix in (".json",) or f.name == "model.safetensors":
            (snap / f.name).symlink_to(f)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("a" * 40)


def test_hub_repo_from_cache_offline(tmp_path, monkeypatch, default_model_dir):
    _fake_hub_cache(tmp_path, "someorg/tiny-llama", default_model_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    path = resolve_model("someorg/tiny-llama")
    assert load_spec(path).architecture.num_hidden_layers == 30
    with pytest.raises(DnError, match="not in the Hugging Face cache and HF_HUB_OFFLINE=1"):
        resolve_model("someorg/not-cached")


def test_unknown_path_is_an_error(tmp_path):
    with pytest.raises(DnError, match="no such model"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(DnError, match="no such file"):
        resolve_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(DnError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_corrupt_gguf_is_an_error_and_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DN_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(default_gguf().read_bytes()[:4096])
    with pytest.raises(DnError, match="GGUF"):
        resolve_model(str(bad))
    assert not any((cache_dir() / "models").iterdir())


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("DN_CACHE", str(tmp_path))

    def half_written(path, out, progress=True, dense=False):
        (out / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(dn_gguf, "convert", half_written)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(default_gguf(), "x", progress=False)
    assert list((tmp_path / "models").iterdir()) == []


def test_unsupported_architecture_folder(tmp_path, default_model_dir):
    shutil.copy(default_model_dir / "config.json", tmp_path / "config.json")
    text = (tmp_path / "config.json").read_text().replace('"llama"', '"gpt_neox"')
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(DnError, match="unsupported architecture 'gpt_neox'"):
        load_spec(resolve_model(str(tmp_path)))


def test_truncated_safetensors_is_an_error(tmp_path, default_model_dir):
    for f in ("config.json", "tokenizer.json"):
        shutil.copy(default_model_dir / f, tmp_path / f)
    with open(default_model_dir / "model.safetensors", "rb") as src:
        (tmp_path / "model.safetensors").write_bytes(src.read(1 << 20))
    with pytest.raises(DnError, match="corrupt safetensors"):
        load_spec(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(DnError, match="not a safetensors file"):
        load_spec(tmp_path)


def test_gguf_conversion_unpermutes_qk(default_model_dir, default_spec):
    # The converted model is checked end to end elsewhere (parity, Paris); here the inverse itself.
    import numpy as np

    w = np.arange(4 * 2 * 3, dtype=np.float32).reshape(8, 3)  # 2 heads x 4 rows
    permuted = w.reshape(2, 2, 2, 3).swapaxes(1, 2).reshape(8, 3)  # llama.cpp's permutation
    np.testing.assert_array_equal(dn_gguf.unpermute(permuted, 2), w)
