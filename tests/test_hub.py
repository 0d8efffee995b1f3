"""The Hugging Face Hub round trip, with no network: `dn convert --upload-repo` is run up to the huggingface_hub
calls it makes, which a fake turns into a local Hugging Face cache; `dn generate --model USER/NAME` (both backends)
and mlx-lm then load the repo id from that cache with HF_HUB_OFFLINE=1."""

import json
import math
import os
import re
import shutil
import subprocess
import sys

import huggingface_hub
import pytest
from helpers import run_dn
from test_families import VOCAB, tiny_model

from dn import hub
from dn.convert import main as convert_main  # dn.convert itself is the Python API's function

REPO = "someone/tiny-q4"
REV = "0123456789abcdef0123456789abcdef01234567"


def tiny_tokenizer(folder):
    """A character tokenizer of exactly VOCAB ids (the tiny model's vocabulary), with an EOS and a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = [chr(i) for i in range(32, 127)]
    names = ["<|endoftext|>", "<unk>", *chars]
    names += [f"<extra_{i}>" for i in range(VOCAB - len(names))]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
           "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


def tiny_source(path):
    src = tiny_model(path, "llama")
    tiny_tokenizer(src)
    return src


class FakeHub:
    """HfApi.create_repo and upload_folder, recorded; an upload lands in a Hugging Face cache laid out as
    huggingface_hub writes it (models--USER--NAME/snapshots/<rev>/..., refs/main)."""

    def __init__(self, cache):
        self.cache, self.calls = cache, []

    def install(self, mp, fail=None):
        def create_repo(api, repo_id, **kw):
            self.calls.append(("create_repo", repo_id, kw))
            if fail:
                raise fail
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(api, *, repo_id, folder_path, **kw):
            self.calls.append(("upload_folder", repo_id, {"folder_path": folder_path, **kw}))
            repo = self.cache / f"models--{repo_id.replace('/', '--')}"
            shutil.copytree(folder_path, repo / "snapshots" / REV)
            (repo / "refs").mkdir()
            (repo / "refs" / "main").write_text(REV)

        mp.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        mp.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
        mp.setattr(huggingface_hub, "get_token", lambda: "hf_fake")
        mp.delenv("HF_HUB_OFFLINE", raising=False)
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture(scope="module")
def uploaded(tmp_path_factory):
    """(fake hub, the converted folder, the HF cache): a tiny Llama converted with -q (4-bit, groups of 32) and
    uploaded to REPO."""
    root = tmp_path_factory.mktemp("hub")
    src, out, fake = tiny_source(root / "src"), root / "q", FakeHub(root / "cache")
    with pytest.MonkeyPatch.context() as mp:
        fake.install(mp)
        rc = convert_main(["--model", str(src), "--out", str(out), "-q", "--q-group-size", "32",
                           "--upload-repo", REPO])
    assert rc == 0
    return fake, out, root / "cache"


def offline(cache) -> dict:
    return {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent / "hf-home")}


def test_upload_calls(uploaded):
    fake, out, _ = uploaded
    assert [c[:2] for c in fake.calls] == [("create_repo", REPO), ("upload_folder", REPO)]
    assert fake.calls[0][2]["exist_ok"] is True and fake.calls[0][2]["private"] is None
    assert fake.calls[1][2]["folder_path"] == str(out)
    assert (out / "README.md").is_file() and (out / "dn_spec.json").is_file()


def test_card_of_plain_quantized_folder(uploaded):
    from dn.model import store
    from dn.model.spec import load_spec

    _, out, _ = uploaded
    card = (out / "README.md").read_text()
    front = card.split("---\n")[1]
    assert "library_name: mlx\n" in front and "- dreamnova\n" in front and "- mlx\n" in front
    assert "base_model" not in front  # a local folder: dn does not know what it was
    assert "4 bits, groups of 32" in card
    spec = load_spec(out)
    dense_bf16 = 2 * sum(e.numel for e in store.entries(spec))
    resident = store.resident_bytes(spec, "bfloat16")["total"]
    assert f"| bfloat16 | {resident / 2**20:,.2f} MiB | {resident / dense_bf16:.1%} |" in card
    assert "Not measured" in card and not re.search(r"perplexity \|\n\|---\|---\|\n\| this", card)
    assert f"dn generate --model {REPO}" in card and f"mlx_lm.generate --model {REPO}" in card


def test_generate_by_repo_id_offline(uploaded, backend_name):
    _, _, cache = uploaded
    proc = run_dn("generate", "--model", REPO, "--backend", backend_name, "--max-tokens", "4", "--prompt", "hi",
                  env=offline(cache))
    assert proc.returncode == 0, proc.stderr
    assert f"[{backend_name} " in proc.stderr and "generated" in proc.stderr


def test_mlx_lm_generates_by_repo_id_offline(uploaded):
    """The card's mlx-lm command runs the plain -q folder from the cache."""
    pytest.importorskip("mlx_lm")
    _, _, cache = uploaded
    proc = subprocess.run([sys.executable, "-m", "mlx_lm", "generate", "--model", REPO, "--prompt", "hi",
                           "--max-tokens", "4"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **offline(cache)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Generation:" in proc.stdout


def test_upload_failure_keeps_folder(tmp_path, monkeypatch, capsys):
    src, out, fake = tiny_source(tmp_path / "src"), tmp_path / "out", FakeHub(tmp_path / "cache")
    fake.install(monkeypatch, fail=OSError("Network is unreachable\nsecond line"))
    rc = convert_main(["--model", str(src), "--out", str(out), "--upload-repo", REPO, "--private"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"dn: error: upload to {REPO} failed")
    assert "Network is unreachable" in err[0] and str(out) in err[0]
    assert fake.calls == [("create_repo", REPO, {"exist_ok": True, "private": True})]
    assert (out / "config.json").is_file() and (out / "README.md").is_file()


@pytest.mark.parametrize(("args", "env", "needle"), [
    (["--upload-repo", "not a repo"], {}, "is not a Hub repo id"),
    (["--upload-repo", REPO], {"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE=1 forbids"),
    (["--private"], {}, "need --upload-repo"),
    (["--card-eval-text", "x.txt"], {}, "need --upload-repo"),
    (["--upload-repo", REPO, "--card-eval-text", "/nonexistent/x.txt"], {}, "no such text file"),
])
def test_refused_before_any_work(tmp_path, monkeypatch, capsys, args, env, needle):
    FakeHub(tmp_path / "cache").install(monkeypatch)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "out"
    rc = convert_main(["--model", str(tmp_path / "no-such-model"), "--out", str(out), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_no_token_refused_before_any_work(tmp_path, monkeypatch, capsys):
    FakeHub(tmp_path / "cache").install(monkeypatch)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    rc = convert_main(["--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "out"),
                       "--upload-repo", REPO])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "needs a Hugging Face token" in err[0]


def test_card_eval_text_measures_both(tmp_path, monkeypatch):
    """--card-eval-text: the card carries the perplexity of the folder and of its source, as dn eval measures it."""
    from dn.evaluate import perplexity
    from dn.runtime import loader

    src, out, fake = tiny_source(tmp_path / "src"), tmp_path / "out", FakeHub(tmp_path / "cache")
    text = tmp_path / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    fake.install(monkeypatch)
    rc = convert_main(["--model", str(src), "--out", str(out), "--codec", "lossless", "--backend", "torch",
                       "--upload-repo", REPO, "--card-eval-text", str(text), "--card-eval-tokens", "600"])
    assert rc == 0
    card = (out / "README.md").read_text()
    assert "library_name: dreamnova\n" in card and "- mlx\n" not in card and "mlx_lm" not in card
    assert "lossless" in card and "Not measured" not in card and str(tmp_path) not in card
    run = loader.load(str(src), "torch", "float32")
    nll, count = perplexity(run.backend, run.model, run.tokenizer.encode(text.read_text())[:600], 512)
    assert f"| its source | {math.exp(nll):.4f} |" in card
    assert f"| this folder | {math.exp(nll):.4f} (+0.00%) |" in card  # lossless: bit-exact
    assert f"first {count} predicted tokens" in card


def test_base_model():
    assert hub.base_model(None) == hub.DEFAULT_BASE
    assert hub.base_model("HuggingFaceTB/SmolLM2-360M") == "HuggingFaceTB/SmolLM2-360M"
    assert hub.base_model("./local/folder") is None
