"""dn bench's records: each (configuration, backend, dtype) measured in its own process (`python -m dn.bench --one
JOB`: a process's first load is what dn.runtime.memory measures exactly), and the folders it runs, made once by
`dn convert` into the dn cache (keyed by model, configuration and calibration text).

Per record: accounted and measured resident weight bytes and their fraction of dense bf16; resident memory while
generating (peak, median, p99 over steps, above the pre-load baseline); the process's own peak and its framework
baseline (absolute, as a peer's max RSS is: dn.bench.peers); perplexity over the text, scored by dn eval's windows
(`all`) or as llama-perplexity scores (`second-half`: second_half_perplexity); decode latency
p50/p99 and tokens/s per batch size, prefill tokens/s (one timer, dn.runtime.timing.timer: warm-up excluded,
repetitions and spread reported); greedy agreement with dense over a fixed prompt set; HumanEval pass@1 and
agreement with `--tasks humaneval`. An `@budget` configuration loads under its residency budget (exact mode).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
from collections import deque
from functools import cache
from pathlib import Path

import numpy as np

from dn import footprint
from dn.bench import humaneval
from dn.bench.configs import Config
from dn.core.errors import DnError
from dn.core.text import read_text
from dn.evaluate import perplexity
from dn.formats import sparse
from dn.runtime import backend as backends
from dn.runtime import loader, memory, residency, timing

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
# Record fields a residency run fills through dn.runtime.residency (None elsewhere).
RESIDENCY_FIELDS = ("fetched_bytes_per_token", "hit_rate")


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
    that follow: the other prompts' greedy continuations at batch 1 (sample_rest), else min(4, reps) more steps of
    the same batch; its peak covers the timed steps too."""
    res.reset()
    if batch == 1:
        g = Greedy(be, model, [prompts[0]])
    else:
        length = min(len(p) for p in prompts)
        g = Greedy(be, model, [prompts[i % len(prompts)][:length] for i in range(batch)])
    t = timing.timer(g.step, reps=reps, warmup=warmup)
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
    t = timing.timer(lambda: be.logits(model, ids, be.make_cache(model), last_only=True), reps=reps, warmup=1)
    return {"prefill_tokens": len(tokens), "prefill_tokens_per_s": ids.size / t["median_s"],
            "prefill_ms_p50": 1e3 * t["median_s"], "prefill_ms_iqr": 1e3 * t["iqr_s"], "prefill_reps": t["reps"]}


def llama_windows(tokens: list[int], ctx: int, bos: int | None) -> np.ndarray:
    """llama-perplexity's windows [n, ctx]: the tokens (their own <bos> first where the model adds one) cut into
    len // ctx windows, the first token of each replaced by bos (None: kept)."""
    n = len(tokens) // ctx
    if n == 0:
        raise DnError(f"the text has {len(tokens)} tokens, fewer than one window of --ctx {ctx}")
    w = np.asarray(tokens[:n * ctx]).reshape(n, ctx).copy()
    if bos is not None:
        w[:, 0] = bos
    return w


def second_half_perplexity(be, model, tokens: list[int], ctx: int, bos: int | None) -> tuple[float, int]:
    """(mean NLL, tokens scored) as llama-perplexity scores them: over llama_windows, only each window's second half
    (targets ctx//2 + 1 .. ctx - 1, each predicted from at least ctx//2 tokens)."""
    total, count = 0.0, 0
    for w in llama_windows(tokens, ctx, bos):
        nll = be.token_nll(model, w[None])[0, ctx // 2:]  # nll[k]: target k + 1
        total, count = total + float(nll.sum()), count + nll.size
    return total / count, count


def load(job: dict):
    """The record's model, and for an `@budget` configuration a function giving its residency fields after the run
    (dn.runtime.residency.fields: resident_peak/median/p99_bytes, fetched_bytes_per_token, hit_rate... which replace
    the runner's own), else None. Under a budget: exact mode, neurons ranked on $DN_CALIB_TEXT when it is set."""
    if not job["budget"]:
        return loader.load(job["folder"], job["backend"], job["dtype"]), None
    run = loader.load(job["folder"], job["backend"], job["dtype"], max_resident=job["budget"], mode="exact",
                      calib_text=os.environ.get("DN_CALIB_TEXT"))
    return run, lambda: residency.fields(run.residency)


def measure(job: dict) -> dict:
    """One (configuration, backend, dtype) in this process: {"common": fields, "batches": [fields per batch],
    "tokens": greedy tokens per prompt, "humaneval_tokens": ...}."""
    phase("load")
    run, fields = load(job)
    be, model, dtype = run.backend, run.model, job["dtype"]
    res = memory.Monitor(be, run.memory)
    # the process before the load (interpreter, framework, model code): what a peer's binary alone is beside it
    framework = memory.snapshot()["rss"] - run.memory["rss_bytes"]
    top = framework + run.memory["rss_peak_bytes"]  # the load's peak; each phase's after it
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
        top = max(top, memory.peak())  # before the next phase's reset
    common |= {"greedy_agreement": 1.0 if job["baseline_tokens"] is None and job["config"] == "dense"
               else _mean_agreement(tokens, job["baseline_tokens"]),
               "agreement_prompts": len(tokens), "agreement_tokens": sum(map(len, tokens))}

    # the prefill's tokens from the text's head: the whole text's encoding (~100 MiB transient on a 600 kB text)
    # comes after the process peak is read
    text = read_text(Path(job["text"]))
    head = run.tokenizer.encode(text[:64 * job["prefill_tokens"]])
    if len(head) <= job["prefill_tokens"]:
        head = run.tokenizer.encode(text)
    for out in batches:
        phase(f"prefill batch {out['batch']}")
        out |= prefill_phase(be, model, head[:job["prefill_tokens"]], out["batch"], job["prefill_reps"])
    top = max(top, memory.peak())

    # the process's own peak (VmHWM since the decode phase's reset, and the load's), before perplexity's long
    # windows: what llama-bench's max RSS covers too (load, prefill, decode)
    common |= {"framework_baseline_bytes": framework,
               "framework_baseline_kind": "RSS of the record's process before the load (interpreter, framework, "
                                          "model code, tokenizer)", "process_peak_bytes": top,
               "process_peak_kind": "max RSS of the record's process through load, decode and prefill",
               "ppl_scoring": None}
    if "ppl" in job.get("skip", ()):
        common |= {"ppl": None, "nll": None, "eval_tokens": 0, "ctx": job["ctx"]}
    else:
        phase("perplexity")
        head = run.tokenizer.encode(text)[:job["max_tokens"]]
        scoring = job.get("ppl_scoring", "all")
        if scoring == "second-half":
            nll, count = second_half_perplexity(be, model, head, job["ctx"], run.tokenizer.bos_id)
        else:
            nll, count = perplexity(be, model, head, job["ctx"], bos=run.tokenizer.bos_id)
        common |= {"ppl": math.exp(nll), "nll": nll, "eval_tokens": count, "ctx": job["ctx"], "ppl_scoring": scoring}

    result = {"common": common, "batches": [b for b in batches if b["batch"] in job["batches"]], "tokens": tokens}
    if job["humaneval"]:
        passed, he_tokens = humaneval.evaluate(run, humaneval.problems(job["humaneval"]["limit"]),
                                               job["humaneval"]["max_tokens"], phase)
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


def one(job_path: str) -> int:
    """The child: measure one job (a JSON file from run_job), write its result where the job says."""
    job = json.loads(Path(job_path).read_text())
    try:
        result = measure(job)
    except DnError as e:
        print(f"dn: error: {e}", file=sys.stderr)
        return 2
    Path(job["out"]).write_text(json.dumps(result))
    return 0


# ---- the run: folders and processes --------------------------------------------------------------------

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
    """Where configuration's folder is cached, made from model_dir, its source (Config.source); model_dir itself
    for dense and native."""
    if config.convert_args() is None:
        return model_dir
    name = config.stored
    if config.sparsity:  # fitted on the calibration text: keyed by its content, the backend that ran it, the router
        name += f"-calib{_digest(calib.read_bytes(), calib_backend, sparse_router(calib_backend, config.fmt))}"
    return root / model_key(model_dir) / name


@cache
def sparse_router(calib_backend: str, fmt: str) -> str:
    """The router a sparse configuration over format fmt fits: dn convert's default where the calibration runs."""
    be = backends.resolve(calib_backend)
    return sparse.default_router(be.NAME, be.device_name(), fmt == "dense")


def convert(config: Config, model_dir: Path, out: Path, calib: Path | None, calib_backend: str, env: dict) -> None:
    """`dn convert` of model_dir (the configuration's source) into out, once."""
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
