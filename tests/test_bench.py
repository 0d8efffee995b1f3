"""`dn bench`: the configuration grammar, bad input as one line, and a whole run on a tiny random Llama with a
word-level tokenizer (each record in its own process, folders converted once into a cache)."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
from helpers import assert_one_line_error
from helpers import run_dn as dn

from dn.bench import configs, report, runner
from dn.core import tensors
from dn.core.errors import DnError
from dn.runtime import residency

H, N, LAYERS, HEADS, KV, HD, VOCAB = 128, 128, 2, 4, 2, 32, 128  # H 128: the sparse router's rank fits


# ---- grammar -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "stored", "args"), [
    ("dense", "dense", None),
    ("native", "native", None),
    ("native+sparse50", "native+sparse50", ["--sparsity", "0.5"]),
    ("native@25%", "native", None),
    ("q8", "q8g64", ["-q", "--q-bits", "8", "--q-group-size", "64"]),
    ("q4g32", "q4g32", ["-q", "--q-bits", "4", "--q-group-size", "32"]),
    ("q4g32e8", "q4g32e8", ["-q", "--q-bits", "4", "--q-group-size", "32", "--q-embedding-bits", "8"]),
    ("lossless", "lossless", ["--codec", "lossless"]),
    ("sparse50", "sparse50", ["--sparsity", "0.5"]),
    ("q4g32+sparse50", "q4g32+sparse50", ["-q", "--q-bits", "4", "--q-group-size", "32", "--sparsity", "0.5"]),
    ("lossless+sparse50@25%", "lossless+sparse50", ["--codec", "lossless", "--sparsity", "0.5"]),
])
def test_config_names(name, stored, args):
    c = configs.parse_config(name)
    assert (c.name, c.stored, c.convert_args()) == (name, stored, args)
    assert c.budget == ("25%" if "@" in name else None)
    assert c.source == ("native" if name.startswith("native") else "dense")  # every other format: from dense


@pytest.mark.parametrize("name", ["foo", "q5", "q4g48", "q4g32e5", "sparse0", "sparse100", "dense+", "q4g32@",
                                  "native4", "nativeg32", "lossless@0%", "dense@101%", "dense@12XB", "+sparse50"])
def test_unknown_configs_raise(name):
    with pytest.raises(DnError):
        configs.parse_config(name)


def test_config_list_dense_first_once_and_budgets():
    names = [c.name for c in configs.parse_configs("q4g32,dense,q4g32,lossless@50%", "25%,1GiB")]
    assert names == ["dense", "q4g32", "lossless@50%", "dense@25%", "q4g32@25%", "dense@1GiB", "q4g32@1GiB"]
    assert [c.name for c in configs.parse_configs("q8")] == ["dense", "q8"]


def test_native_over_gguf_blocks_is_one_line_or_left_out():
    """A GGUF's native folder cannot yet be sparse: one line when named, left out when added; under a budget it
    runs (residency over its blocks)."""
    cfgs = configs.parse_configs("native,native+sparse50,q4g32", "25%")
    with pytest.raises(DnError, match=r"'native\+sparse50': the sparse MLP .* not over a GGUF's blocks yet "
                                      r"\(try q4g32e8\+sparse50\)"):
        configs.over_gguf(cfgs, {"native", "native+sparse50", "q4g32"})
    kept, left = configs.over_gguf(configs.parse_configs("native,native+sparse50", "25%"), {"native"})
    assert [c.name for c in kept] == ["dense", "native", "dense@25%", "native@25%"]
    assert left == ["native+sparse50", "native+sparse50@25%"]


def test_folders_come_from_their_source(tmp_path):
    """dense and native run their source folders as they are; every other format is converted from dense, native's
    compositions from native, each cached under its source's key."""
    src = {k: tmp_path / k for k in ("dense", "native")}
    for d in src.values():
        d.mkdir()
        (d / "config.json").write_text("{}")
    root = tmp_path / "cache"

    def folder(name):
        c = configs.parse_config(name)
        return runner.folder_for(c, src[c.source], root, None, "torch")

    assert folder("dense") == src["dense"] and folder("native@25%") == src["native"]
    assert folder("q4g32") == root / runner.model_key(src["dense"]) / "q4g32"
    assert folder("lossless") == root / runner.model_key(src["dense"]) / "lossless"
    assert runner.model_key(src["native"]) != runner.model_key(src["dense"])


def test_keyed_values():
    table = configs.keyed("32,lossless:4,mlx:8", "--decode-tokens", int)
    pick = {n: configs.pick(table, configs.parse_config(n), b) for n, b in
            (("dense", "torch"), ("lossless", "mlx"), ("q8", "mlx"), ("lossless@25%", "torch"))}
    assert pick == {"dense": 32, "lossless": 4, "q8": 8, "lossless@25%": 4}
    per_backend = configs.keyed("torch:4096,mlx:1024", "--max-tokens", int)
    assert configs.pick(per_backend, configs.parse_config("q8"), "mlx") == 1024
    with pytest.raises(DnError, match="--max-tokens has no value for q8 on torch"):
        configs.pick(configs.keyed("mlx:4", "--max-tokens", int), configs.parse_config("q8"), "torch", "--max-tokens")


def test_budget_configs_load_under_the_budget(monkeypatch):
    """An `@budget` record loads its folder under the budget (exact mode, cold file ranked on $DN_CALIB_TEXT) and
    reads dn.runtime.residency.fields after the run; any other record loads plainly and has no such fields."""
    calls = []

    def load(model, backend, dtype, **kw):
        calls.append((model, backend, dtype, kw))
        return types.SimpleNamespace(residency=None)

    monkeypatch.setattr(runner.loader, "load", load)
    monkeypatch.setenv("DN_CALIB_TEXT", "/calib.txt")
    job = {"folder": "/f", "backend": "torch", "dtype": "float32", "budget": None}
    assert runner.load(job)[1] is None and calls.pop() == ("/f", "torch", "float32", {})
    _, fields = runner.load(job | {"budget": configs.parse_config("q4g32@25%").budget})
    assert calls.pop() == ("/f", "torch", "float32", {"max_resident": "25%", "mode": "exact",
                                                      "calib_text": "/calib.txt"})
    assert fields() == residency.fields(None) and set(runner.RESIDENCY_FIELDS) <= set(fields())


def test_relate_and_table():
    def rec(config, ppl, tps, **kw):
        return {"config": config, "backend": "torch", "dtype": "bfloat16", "batch": 1, "ppl": ppl,
                "tokens_per_s": tps, "prefill_tokens_per_s": 10 * tps, "resident_fraction": 0.5,
                "measured_fraction": 0.5, "resident_peak_bytes": 2**20, "latency_ms_p50": 1e3 / tps,
                "latency_ms_p99": 2e3 / tps, "greedy_agreement": 1.0} | kw
    records = [rec("dense", 10.0, 20.0), rec("q4g32", 11.0, 40.0, greedy_agreement=0.5),
               {"config": "q3g32", "backend": "torch", "dtype": "bfloat16", "batch": 1, "error": "boom | bad"}]
    report.relate(records)
    assert records[1]["ppl_delta_pct"] == pytest.approx(10.0) and records[1]["speed_vs_dense"] == 2.0
    md = report.table(records).splitlines()
    assert len(md) == 5 and "+10.00%" in md[3] and "2.00x" in md[3] and "failed: boom / bad" in md[4]
    assert len({line.count("|") for line in md}) == 1


# ---- bad input: one line, before any work --------------------------------------------------------------------

@pytest.mark.parametrize(("args", "needle"), [
    (["--configs", "dense,q4g48"], "unknown config 'q4g48'"),
    (["--configs", "frobnicate"], "unknown config 'frobnicate'"),
    (["--configs", "q4@x"], "bad residency budget"),
    (["--max-resident", "0%"], "bad residency budget"),
    (["--backends", "torch,jax"], "unknown backend"),
    (["--dtypes", "float16"], "--dtypes"),
    (["--batch", "1,0"], "--batch"),
    (["--decode-tokens", "32,q9:4"], "names neither a config nor a backend"),
    (["--max-tokens", "64,lossless:32"], "per backend only"),
    (["--tasks", "mmlu"], "unknown task"),
    (["--skip", "ppl,prefill"], "--skip: unknown phase"),
])
def test_bad_flags_are_one_line(tmp_path, args, needle):
    text = tmp_path / "t.txt"
    text.write_text("some text")
    assert_one_line_error(dn("bench", "--text", str(text), "--json", str(tmp_path / "o.json"), "--backends",
                             "torch", *args), needle)


def test_bad_paths_are_one_line(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("some text")
    assert_one_line_error(dn("bench", "--text", str(text)), "--json OUT is required")
    assert_one_line_error(dn("bench", "--text", str(tmp_path / "no.txt"), "--json", str(tmp_path / "o.json")),
                          "no such text file")
    assert_one_line_error(dn("bench", "--text", str(text), "--json", str(tmp_path / "no" / "o.json")),
                          "does not exist")
    assert_one_line_error(dn("bench", "--text", str(text), "--configs", "sparse50", "--calib-text", str(text),
                             "--json", str(tmp_path / "o.json")), "calibration text is the evaluation text")


def test_native_gguf_composition_is_one_line(tmp_path):
    """The default model is a GGUF: native+sparse50 stops at once, naming what is missing."""
    text, calib = tmp_path / "t.txt", tmp_path / "c.txt"
    text.write_text("some text")
    calib.write_text("other text")
    assert_one_line_error(dn("bench", "--text", str(text), "--calib-text", str(calib), "--configs", "native+sparse50",
                             "--backends", "torch", "--json", str(tmp_path / "o.json")),
                          "'native+sparse50': the sparse MLP is fitted over dense or affine weights")


# ---- a whole run on a tiny model -----------------------------------------------------------------------------

def tiny_model(root):
    """A random Llama (bf16 weights) with a word-level tokenizer over words w0..w126, and texts in those words."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = {"model_type": "llama", "hidden_size": H, "intermediate_size": N, "num_hidden_layers": LAYERS,
           "num_attention_heads": HEADS, "num_key_value_heads": KV, "head_dim": HD, "vocab_size": VOCAB,
           "rms_norm_eps": 1e-6, "max_position_embeddings": 256, "tie_word_embeddings": True, "rope_theta": 1e4}
    shapes = {"model.embed_tokens.weight": (VOCAB, H), "model.norm.weight": (H,)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (HEADS * HD, H), p + "self_attn.k_proj.weight": (KV * HD, H),
                   p + "self_attn.v_proj.weight": (KV * HD, H), p + "self_attn.o_proj.weight": (H, HEADS * HD),
                   p + "mlp.gate_proj.weight": (N, H), p + "mlp.up_proj.weight": (N, H),
                   p + "mlp.down_proj.weight": (H, N), p + "input_layernorm.weight": (H,),
                   p + "post_attention_layernorm.weight": (H,)}
    rng = np.random.default_rng(0)
    weights = {k: (tensors.f32_to_bf16(((1 + 0.1 * rng.standard_normal(s)) if "norm" in k
                                               else 0.1 * rng.standard_normal(s)).astype(np.float32)), "BF16")
               for k, s in shapes.items()}
    model = root / "model"
    model.mkdir(parents=True)
    tensors.save(weights, model / "model.safetensors")
    (model / "config.json").write_text(json.dumps(cfg))
    words = [f"w{i}" for i in range(VOCAB - 1)]
    tok = Tokenizer(models.WordLevel({"[UNK]": 0} | {w: i + 1 for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(model / "tokenizer.json"))
    for name, n in (("eval.txt", 400), ("calib.txt", 600)):
        (root / name).write_text(" ".join(words[j] for j in rng.integers(0, VOCAB - 1, n)))
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("bench"))


def test_bench_run(backend_name, tiny, tmp_path):
    root, cache = tiny.parent, tiny.parent / "cache"
    out = {k: tmp_path / f"bench.{k}" for k in ("json", "md", "png")}
    args = ["bench", "--model", str(tiny), "--text", str(root / "eval.txt"), "--calib-text", str(root / "calib.txt"),
            "--configs", "native,q4g32,lossless,sparse50", "--backends", backend_name, "--dtypes", "float32",
            "--batch", "1,2", "--max-tokens", "200", "--ctx", "64", "--decode-tokens", "3,lossless:2",
            "--prefill-tokens", "16", "--prefill-reps", "2", "--threads", "1", "--cache", str(cache),
            "--json", str(out["json"]), "--markdown", str(out["md"]), "--plot", str(out["png"])]
    proc = dn(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out["json"].read_text())
    assert {"machine", "versions", "command", "commit", "records"} <= set(result) and result["complete"]
    assert result["command"].startswith("dn bench --model")
    recs = {(r["config"], r["batch"]): r for r in result["records"]}
    assert set(recs) == {(c, b) for c in ("dense", "native", "q4g32", "lossless", "sparse50") for b in (1, 2)}
    for r in recs.values():
        assert r["backend"] == backend_name and r["dtype"] == "float32" and "error" not in r
        for key in ("resident_weight_bytes", "measured_resident_bytes", "resident_peak_bytes",
                    "resident_median_bytes", "resident_p99_bytes", "tokens_per_s", "latency_ms_p50",
                    "latency_ms_p99", "prefill_tokens_per_s", "ppl"):
            assert r[key] > 0, key
        assert r["resident_fraction"] == r["resident_weight_bytes"] / r["dense_bf16_bytes"]
        assert r["latency_ms_p50"] <= r["latency_ms_p99"] and r["fetched_bytes_per_token"] is None
        assert 0 <= r["greedy_agreement"] <= 1 and r["agreement_prompts"] == len(runner.PROMPTS)
    dense, lossless, q4 = recs[("dense", 1)], recs[("lossless", 1)], recs[("q4g32", 1)]
    assert dense["resident_fraction"] == 2.0 and dense["ppl_delta_pct"] == 0 and dense["speed_vs_dense"] == 1
    assert lossless["ppl"] == dense["ppl"] and lossless["greedy_agreement"] == 1.0  # bit-exact
    native = recs[("native", 1)]  # a safetensors folder's native form is the folder itself, as dense is
    assert native["ppl"] == dense["ppl"] and native["resident_fraction"] == 2.0 and native["greedy_agreement"] == 1.0
    assert lossless["decode_reps"] == 2 and q4["decode_reps"] == 3
    assert q4["resident_fraction"] < 0.5 and recs[("q4g32", 2)]["tokens_per_s"] > 0
    assert q4["ppl_delta_pct"] == pytest.approx(100 * (q4["ppl"] / dense["ppl"] - 1))
    md = out["md"].read_text()
    assert md.count("\n") == 2 + len(recs) and "| lossless | " in md
    assert out["png"].read_bytes()[:4] == b"\x89PNG"
    folders = sorted(p.name for p in next(cache.iterdir()).iterdir())
    assert folders[:2] == ["lossless", "q4g32"] and folders[2].startswith("sparse50-calib")


# ---- benchmarks/bench_shapes.py: its model builder at a tiny size, and dn bench --skip on it ------------------

def _bench_shapes():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_shapes.py"
    spec = importlib.util.spec_from_file_location("bench_shapes", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shapes_model_and_skip(tmp_path, eval_text):
    """The Llama-3-8B-shaped builder (here at a tiny size): LlamaForCausalLM with an untied lm_head, GQA, bf16
    weights of std 0.02, the default model's tokenizer; built once. Then dn bench on it without perplexity and with
    agreement over the timed prompt only."""
    from dn.model.spec import load_spec

    shapes = _bench_shapes()
    dims = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 32}
    model = shapes.build(tmp_path / "m", layers=2, **dims)
    mtime = (model / "model.safetensors").stat().st_mtime_ns
    assert shapes.build(tmp_path / "m", layers=2, **dims) == model  # cached: not rebuilt
    assert (model / "model.safetensors").stat().st_mtime_ns == mtime
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["rope_theta"] == 500000.0 and cfg["rms_norm_eps"] == 1e-5 and not cfg["tie_word_embeddings"]
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_hidden_layers"] == 2
    spec = load_spec(model)
    assert spec.architecture.vocab_size == 49152 and spec.architecture.num_key_value_heads == 2
    w = tensors.load(model / "model.safetensors")
    assert w["lm_head.weight"][0].shape == (49152, 128) and w["model.layers.1.mlp.down_proj.weight"][1] == "BF16"
    up = tensors.bf16_to_f32(w["model.layers.0.mlp.up_proj.weight"][0])
    assert up.shape == (256, 128) and abs(up.std() - 0.02) < 1e-3 and abs(up.mean()) < 1e-3
    assert (tensors.bf16_to_f32(w["model.norm.weight"][0]) == 1).all()
    assert "Llama-3-8B" in shapes.__doc__ and shapes.LLAMA3_8B["intermediate_size"] == 14336

    out = tmp_path / "bench.json"
    proc = dn("bench", "--model", str(model), "--text", str(eval_text), "--configs", "q4g32", "--backends", "torch",
              "--batch", "1", "--max-tokens", "64",
              "--decode-tokens", "3", "--warmup", "1", "--prefill-tokens", "8", "--prefill-reps", "1",
              "--skip", "ppl,agreement", "--threads", "1", "--cache", str(tmp_path / "cache"), "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = {r["config"]: r for r in json.loads(out.read_text())["records"]}
    assert set(recs) == {"dense", "q4g32"}
    for r in recs.values():
        assert r["ppl"] is None and r["ppl_delta_pct"] is None and r["eval_tokens"] == 0
        assert r["agreement_prompts"] == 1 and r["agreement_tokens"] == 1 + 3 + 3 and r["tokens_per_s"] > 0
    assert recs["q4g32"]["speed_vs_dense"] > 0 and 0 <= recs["q4g32"]["greedy_agreement"] <= 1
    assert "| q4g32 | torch | bfloat16 | 1 |" in proc.stdout and "| – | – |" in proc.stdout
