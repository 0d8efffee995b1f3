"""A GGUF as it is (issue 20's done-when), in one run: dn on the native folder against its bf16 widening (--dense) and
against llama.cpp on the same file, each in a fresh process measured by the platform (max RSS of the child).

Per model: the cached folder's bytes against the GGUF's; per backend, the framework baseline (max RSS of a process
that imports only what dn's load imports: torch + transformers' model code, or mlx + mlx-lm's), then `dn generate`
native and --dense: the process's max RSS, the greedy answer and decode tok/s at --dtype auto; the load's own peak
(dn footprint); perplexity native vs --dense at float32 on torch; llama.cpp's records (dn/bench/peers.py).

    PYTHONPATH=. python benchmarks/bench_native.py [--models default,gemma3-270m,qwen2.5-coder-1.5b]
        [--backends torch,mlx] [--threads 1] [--ppl-tokens 4096] [--json docs/results/native.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from dn.bench import peers
from dn.model import store
from dn.model.sources import SHORT_NAMES, default_gguf, parts_gguf, resolve_model, short_name_gguf
from dn.model.spec import load_spec
from dn.runtime import timing

PROMPTS = {"default": "What is the capital of France?", "gemma3-270m": "What is the capital of France?",
           "qwen2.5-coder-1.5b": "Write a Python function is_prime(n) that returns True when n is prime."}
_BASELINE = ("import sys; from dn.runtime import backend; from dn.model.spec import load_spec; "
             "backend.get(sys.argv[1]).import_model_code(load_spec(sys.argv[2]))")
_STATS = re.compile(r"generated (\d+) tokens ([0-9.]+) tok/s")


def gguf_of(model: str) -> Path:
    if model == "default":
        return default_gguf()
    return short_name_gguf(model) if model in SHORT_NAMES else parts_gguf(model)


def dn_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "dn.cli", *args]


def generate(model: str | None, backend: str, env: dict, tokens: int, dense: bool, timeout: float) -> dict:
    args = ["generate", "--backend", backend, "--prompt", PROMPTS[model or "default"], "--max-tokens", str(tokens)]
    args += (["--model", model] if model else []) + (["--dense"] if dense else [])
    peak, out, err, secs = peers.max_rss(dn_cmd(*args), env, timeout)
    m = _STATS.search(err)
    dtype = re.search(r"\[\w+ \S+ (\w+)\]", err)
    return {"process_peak_bytes": peak, "answer": out.strip(), "tokens": int(m[1]) if m else None,
            "tokens_per_s": float(m[2]) if m else None, "dtype": dtype[1] if dtype else None, "seconds": secs,
            "command": args}


def load_peak(model: str | None, backend: str, env: dict, dense: bool, timeout: float) -> dict:
    """dn footprint's measured load: what the load holds after it and at its peak, above its own baseline."""
    with tempfile.TemporaryDirectory() as d:
        args = ["footprint", "--backend", backend, "--json", f"{d}/f.json"] + (["--model", model] if model else [])
        peers.max_rss(dn_cmd(*args + (["--dense"] if dense else [])), env, timeout)
        m = json.loads(Path(f"{d}/f.json").read_text())["measured"]
    return {k: m.get(k) for k in ("measured_resident_bytes", "load_peak_bytes", "resident_weight_bytes")}


def perplexity(model: str | None, env: dict, text: str, tokens: int, dense: bool, timeout: float) -> float:
    with tempfile.TemporaryDirectory() as d:
        args = ["eval", "--backend", "torch", "--dtype", "float32", "--text", text, "--max-tokens", str(tokens),
                "--json", f"{d}/e.json"] + (["--model", model] if model else []) + (["--dense"] if dense else [])
        peers.max_rss(dn_cmd(*args), env, timeout)
        return json.loads(Path(f"{d}/e.json").read_text())["ppl"]


def first_run(model: str | None, backend: str, env: dict, timeout: float) -> float:
    """Seconds of a first `dn generate` (one token) with an empty dn cache: assembling the GGUF from its packages,
    converting and loading it."""
    with tempfile.TemporaryDirectory() as cache:
        args = ["generate", "--backend", backend, "--prompt", "hi", "--max-tokens", "1"]
        _, _, _, secs = peers.max_rss(dn_cmd(*args + (["--model", model] if model else [])),
                                      env | {"DN_CACHE": cache}, timeout)
    return secs


def model_records(model: str, backends: list[str], threads: int, text: str, ppl_tokens: int, tokens: int,
                  timeout: float, with_peers: bool) -> list[dict]:
    name = None if model == "default" else model
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    gguf = gguf_of(model)
    folder = resolve_model(name)
    spec = load_spec(folder)
    common = {"model": model, "gguf_bytes": gguf.stat().st_size, "threads": threads,
              "first_run_seconds": first_run(name, backends[0], env, timeout),
              "folder_bytes": sum(f.stat().st_size for f in folder.iterdir() if f.is_file()),
              "gguf_types": sorted(set(spec.gguf.values())),
              "accounted_weight_bytes": store.held_bytes(spec, "float32")}
    records = []
    for be in backends:
        base, _, _, _ = peers.max_rss([sys.executable, "-c", _BASELINE, be, str(folder)], env, timeout)
        rec = common | {"backend": be, "framework_baseline_bytes": base}
        for label, dense in (("native", False), ("dense", True)):
            if dense and model == "qwen2.5-coder-1.5b":
                continue  # the widening is 3.4 GB on disk and 7 GB in float32: measured once, in the issue
            r = generate(name, be, env, tokens if be == "torch" or model == "default" else 8, dense, timeout)
            r |= load_peak(name, be, env, dense, timeout)
            records.append(rec | {"config": label} | r | {"peak_minus_baseline_bytes": r["process_peak_bytes"] - base,
                                                           "peak_minus_baseline_over_gguf":
                                                           (r["process_peak_bytes"] - base) / gguf.stat().st_size})
            print(json.dumps({k: records[-1][k] for k in ("model", "backend", "config", "process_peak_bytes",
                                                          "framework_baseline_bytes", "tokens_per_s")}),
                  file=sys.stderr)
    if ppl_tokens:
        native = perplexity(name, env, text, ppl_tokens, False, timeout)
        dense = perplexity(name, env, text, ppl_tokens, True, timeout) if model != "qwen2.5-coder-1.5b" else None
        records.append(common | {"backend": "torch", "config": "ppl", "dtype": "float32", "ppl_native": native,
                                 "ppl_dense": dense, "ppl_tokens": ppl_tokens, "ppl_text": text,
                                 "ppl_rel_diff": None if dense is None else native / dense - 1})
    if with_peers:
        for r in peers.llama_cpp(gguf, text, threads=threads, skip=("ppl",)):
            records.append(common | r | {"model": model})
    return records


def markdown(result: dict) -> str:
    """The records as tables: memory and speed per model, backend and config; perplexity; llama.cpp beside them."""
    mib = lambda b: f"{b / 2**20:.1f}"
    rows = ["| model | backend | config | dtype | process peak MiB | baseline MiB | peak - baseline MiB | / GGUF | "
            "load peak MiB | tok/s | answer |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["records"]:
        if r.get("config") == "ppl" or "process_peak_bytes" not in r:
            continue
        over = (r["process_peak_bytes"] - r["framework_baseline_bytes"]) / r["gguf_bytes"]
        answer = (r.get("answer") or "").replace("\n", " ").replace("|", "/")[:60]
        rows.append(f"| {r['model']} | {r['backend']} | {r['config']} | {r.get('dtype') or ''} | "
                    f"{mib(r['process_peak_bytes'])} | {mib(r['framework_baseline_bytes'])} | "
                    f"{mib(r['process_peak_bytes'] - r['framework_baseline_bytes'])} | {over:.2f} | "
                    f"{mib(r['load_peak_bytes']) if r.get('load_peak_bytes') else ''} | {r['tokens_per_s']:.1f} | "
                    f"{answer} |")
    rows += ["", "| model | GGUF MB | folder MB | first run s | ppl native | ppl dense | native / dense - 1 |",
             "|---|---|---|---|---|---|---|"]
    for r in result["records"]:
        if r.get("config") == "ppl":
            dense = "" if r["ppl_dense"] is None else f"{r['ppl_dense']:.4f}"
            rel = "" if r["ppl_rel_diff"] is None else f"{100 * r['ppl_rel_diff']:+.3f}%"
            rows.append(f"| {r['model']} | {r['gguf_bytes'] / 1e6:.1f} | {r['folder_bytes'] / 1e6:.1f} | "
                        f"{r['first_run_seconds']:.0f} | {r['ppl_native']:.4f} | {dense} | {rel} |")
    return "\n".join([f"`{result['command']}` at {result['commit']}", "", *rows, ""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="default,gemma3-270m")
    p.add_argument("--backends", default="torch,mlx")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokens", type=int, default=32, help="tokens generated per dn generate")
    p.add_argument("--ppl-tokens", type=int, default=4096, help="tokens of --text scored (0: skip perplexity)")
    p.add_argument("--text", default=os.environ.get("DN_EVAL_TEXT", "tests/data/eval-small.txt"))
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--json", default="docs/results/native.json")
    p.add_argument("--markdown", default=None, help="the tables, written here too")
    args = p.parse_args(argv)
    if shutil.which("cc") is None:
        print("bench_native: note: no C compiler, dn runs its plain paths", file=sys.stderr)
    records = []
    for model in args.models.split(","):
        records += model_records(model, args.backends.split(","), args.threads, args.text, args.ppl_tokens,
                                 args.tokens, args.timeout, not args.no_peers)
    result = timing.report(records, ["benchmarks/bench_native.py", *(argv or sys.argv[1:])])
    timing.write(result, args.json)
    if args.markdown:
        Path(args.markdown).write_text(markdown(result))
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
