"""`dn bench` on realistic shapes: a random-weight model with Llama-3-8B's layer shapes, a few layers.

    python benchmarks/bench_shapes.py [--layers 4] [--backends torch] [--batch 1,4] [--configs ...]
        [--interleaved 16] [--json docs/results/bench-shapes-cpu.json] [--markdown ...] [-- extra dn bench flags]

Builds once into the dn cache (<cache>/shapes/llama3-8b-L<layers>-s<seed>/) a LlamaForCausalLM folder: hidden
4096, intermediate 14336, 32 query heads / 8 KV heads of 128, rope theta 500000, rms eps 1e-5, untied lm_head;
weights N(0, 0.02) in bf16 (norms 1): quality is irrelevant, bytes and shapes are what decode speed reads. The
tokenizer is the default model's (so dn bench can tokenize its prompts), which makes the vocabulary 49152, not
Llama-3's 128256 (docs/fastpaths-shapes.md says how that moves the ratios). Then it runs `dn bench` (dn.bench.main,
same JSON) on that folder with perplexity skipped (meaningless on random weights) and agreement on the timed
prompt only. Sparse configs are calibrated on the first --calib-tokens of $DN_CALIB_TEXT (a cut copy is written
beside the model): a full 16k-token calibration of 4096x14336 layers takes too long on a small CPU.
`--interleaved STEPS` then loads every config in one process and times their decode steps in turns
(<json>-interleaved.json): dn bench's records run one process after another, so on shared cores their ratios follow
the load; the interleaved ones do not.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dn import bench  # noqa: E402
from dn.bench import configs as bench_configs  # noqa: E402
from dn.bench import runner  # noqa: E402
from dn.core import tensors  # noqa: E402
from dn.core.errors import DnError  # noqa: E402
from dn.core.files import atomic_dir, cache_dir  # noqa: E402
from dn.core.text import read_text, text_path  # noqa: E402
from dn.model import spec  # noqa: E402
from dn.model.sources import resolve_model  # noqa: E402
from dn.model.tokenizer import Tokenizer  # noqa: E402
from dn.runtime import loader, timing  # noqa: E402

LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
             "head_dim": 128, "rope_theta": 500000.0, "rms_norm_eps": 1e-5}
CONFIGS = "dense,lossless,sparse50,q4g32e8,q4g32e8+sparse50"
STD = 0.02


def _random_bf16(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    out = np.empty(shape, np.uint16)
    flat, step = out.reshape(-1), 1 << 24  # a float32 chunk at a time: the peak stays near the bf16 model
    for i in range(0, flat.size, step):
        m = min(step, flat.size - i)
        flat[i:i + m] = tensors.f32_to_bf16(rng.standard_normal(m, dtype=np.float32) * np.float32(STD))
    return out


def build(out: Path, layers: int = 4, tokenizer_dir: Path | None = None, seed: int = 0, **dims) -> Path:
    """The model folder at out (made once: config.json is renamed in last). dims override LLAMA3_8B's (tests use
    tiny ones). The tokenizer files are the default model's unless tokenizer_dir is given."""
    if (out / "config.json").is_file():
        return out

    src = Path(tokenizer_dir) if tokenizer_dir else resolve_model(None)
    src_cfg = json.loads((src / "config.json").read_text())
    cfg = {"model_type": "llama", **LLAMA3_8B, **dims, "num_hidden_layers": layers,
           "vocab_size": src_cfg["vocab_size"], "max_position_embeddings": 8192, "tie_word_embeddings": False,
           "attention_bias": False, "mlp_bias": False, "bos_token_id": src_cfg.get("bos_token_id"),
           "eos_token_id": src_cfg.get("eos_token_id"), "torch_dtype": "bfloat16",
           "architectures": ["LlamaForCausalLM"]}
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in spec.tensor_shapes(spec.Architecture.from_hf_config(cfg), norms=True).items():
        weights[name] = (np.full(shape, 0x3F80, np.uint16) if "norm" in name else _random_bf16(rng, tuple(shape)),
                         "BF16")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        tensors.save(weights, tmp / "model.safetensors")
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (src / f).is_file():
                shutil.copy(src / f, tmp / f)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        if out.exists():
            shutil.rmtree(out)
    return out


def cut_text(src: Path, out: Path, tokenizer_dir: Path, tokens: int) -> Path:
    """The first `tokens` tokens of src as text (written once; dn bench keys sparse folders by its content)."""
    if not out.is_file():
        tok = Tokenizer(tokenizer_dir)
        ids = tok.encode(read_text(src), add_special_tokens=False)
        if len(ids) < tokens:
            raise DnError(f"{src} has {len(ids)} tokens, fewer than --calib-tokens {tokens}")
        out.write_text(tok.decode(ids[:tokens]))
    return out


def interleaved(model: Path, configs: list, calib: Path | None, batches: list[int], reps: int, warmup: int,
                backend: str = "torch", dtype: str = "bfloat16") -> list[dict]:
    """Every config's folder (dn bench's cache) loaded in this one process and its decode steps timed in turns, one
    step of each per round (dn.runtime.timing.interleaved): on shared cores the ratios of sequential processes
    follow the load, these do not. Greedy tokens from the first prompt, as dn bench's."""
    root = cache_dir() / "bench"
    runs = {c.name: loader.load(str(runner.folder_for(c, model, root, calib, "auto")), backend, dtype) for c in configs}
    prompts = [runs[configs[0].name].tokenizer.encode(p) for p in runner.PROMPTS]
    out = []
    for b in batches:
        length = min(map(len, prompts))
        ids = [prompts[0]] if b == 1 else [prompts[i % len(prompts)][:length] for i in range(b)]
        steps = {name: runner.Greedy(r.backend, r.model, ids).step for name, r in runs.items()}
        times = timing.interleaved(steps, reps, warmup)
        dense = times[configs[0].name]["median_s"]
        for name, t in times.items():
            med = t["median_s"]
            out.append({"config": name, "backend": backend, "dtype": dtype, "batch": b, "tokens_per_s": b / med,
                        "latency_ms_p50": 1e3 * med, "latency_ms_iqr": 1e3 * t["iqr_s"], "speed_vs_dense": dense / med,
                        "decode_reps": reps, "decode_warmup": warmup})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--configs", default=CONFIGS)
    p.add_argument("--backends", default="torch", help="torch; add mlx when it fits in time (torch,mlx)")
    p.add_argument("--batch", default="1,4")
    p.add_argument("--dtypes", default="bfloat16")
    p.add_argument("--decode-tokens", default="8,lossless:2", help="dn bench --decode-tokens")
    p.add_argument("--calib-tokens", type=int, default=2048, help="calibration tokens of the sparse configs")
    p.add_argument("--threads", default="1")
    p.add_argument("--cache", default=None, help="where the model folder goes (default: <dn cache>/shapes)")
    p.add_argument("--build-only", action="store_true")
    p.add_argument("--json", default=str(ROOT / "docs" / "results" / "bench-shapes-cpu.json"))
    p.add_argument("--markdown", default=None)
    p.add_argument("--interleaved", type=int, default=0, metavar="STEPS",
                   help="after dn bench, also time STEPS decode steps of every config in one process, in turns "
                        "(ratios that hold on shared cores) -> <json>-interleaved.json")
    p.add_argument("--interleaved-only", action="store_true", help="skip dn bench (its folders must exist)")
    args, extra = p.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    os.environ["OMP_NUM_THREADS"] = args.threads  # before anything imports torch (the interleaved timing)

    root = Path(args.cache).expanduser() if args.cache else cache_dir() / "shapes"
    model = build(root / f"llama3-8b-L{args.layers}-s{args.seed}", args.layers, seed=args.seed)
    print(f"model: {model}", file=sys.stderr)
    if args.build_only:
        return 0
    text = text_path(None, "DN_EVAL_TEXT")
    read_text(text)
    cmd = ["--model", str(model), "--text", str(text), "--configs", args.configs, "--backends", args.backends,
           "--dtypes", args.dtypes, "--batch", args.batch, "--max-tokens", "64", "--skip", "ppl,agreement",
           "--decode-tokens", args.decode_tokens, "--warmup", "1", "--prefill-tokens", "32", "--prefill-reps", "2",
           "--threads", args.threads, "--json", args.json]
    if "sparse" in args.configs:
        calib = cut_text(text_path(None, "DN_CALIB_TEXT"), model.parent / f"calib-{args.calib_tokens}.txt",
                         resolve_model(None), args.calib_tokens)
        cmd += ["--calib-text", str(calib)]
    cmd += ["--markdown", args.markdown] if args.markdown else []
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rc = 0 if args.interleaved_only else bench.main(cmd + extra)
    if args.interleaved:
        if "torch" in sys.modules:  # imported already (dn bench checks its backends): set its threads here too
            sys.modules["torch"].set_num_threads(int(args.threads))
        calib = Path(cmd[cmd.index("--calib-text") + 1]) if "--calib-text" in cmd else None
        configs = bench_configs.parse_configs(args.configs)
        records = interleaved(model, configs, calib, sorted({int(b) for b in args.batch.split(",")}),
                              args.interleaved, 2)
        script = " ".join(["python", "benchmarks/bench_shapes.py", *(argv or sys.argv[1:])])
        path = Path(args.json).with_name(Path(args.json).stem + "-interleaved.json")
        timing.write(timing.report(records, script.split(), threads=int(args.threads),
                                   loadavg=os.getloadavg()), path)
        for r in records:
            print(f"{r['config']:>18} batch {r['batch']}: {r['tokens_per_s']:.2f} tok/s, {r['speed_vs_dense']:.2f}x "
                  f"dense (p50 {r['latency_ms_p50']:.1f} ms, iqr {r['latency_ms_iqr']:.1f})")
        if args.interleaved_only:
            return 0
    if Path(args.json).is_file():  # dn bench's JSON records its own command line: add this script's, the shapes
        result = json.loads(Path(args.json).read_text())
        result["script"] = " ".join(["python", "benchmarks/bench_shapes.py", *(argv or sys.argv[1:])])
        result["shapes"] = json.loads((model / "config.json").read_text())
        timing.write(result, args.json)
    return rc


if __name__ == "__main__":
    sys.exit(main())
