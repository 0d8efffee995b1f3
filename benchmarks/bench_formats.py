"""Weight formats on the default model, each as a user gets it from `dn convert`: perplexity on a text, accounted
and platform-measured resident bytes as a fraction of dense bf16, load peak, and decode speed against dense
measured in the same run, on each backend.

    python benchmarks/bench_formats.py --text ../shared/data/eval.txt --json docs/results/formats-cpu.json \\
        --markdown docs/results/formats-cpu.md

Each (config, backend) runs in a fresh process (a process's first load is what dn.memory measures exactly).
Configs: dense, q<B>g<G> (mlx-lm affine, B bits, groups of G, embedding too), q<B>g<G>e<E> (embedding at E
bits, groups of G), lossless; converted once into --work.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from dn import benchmark

CONFIGS = "dense,q4g32e8,q4g32,q4g64,q8g64,q3g32"
PROMPT = "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined"


def convert_args(config: str) -> list[str] | None:
    """dn convert flags for a config name (None: the dense model itself)."""
    if config == "dense":
        return None
    if config == "lossless":
        return ["--codec", "lossless"]
    m = re.fullmatch(r"q(\d)g(\d+)(?:e(\d))?", config)
    if not m:
        raise SystemExit(f"unknown config {config!r}")
    args = ["-q", "--q-bits", m[1], "--q-group-size", m[2]]
    return args + (["--q-embedding-bits", m[3]] if m[3] else [])


def folder(config: str, work: Path) -> str | None:
    args = convert_args(config)
    if args is None:
        return None
    out = work / config
    if not out.exists():
        subprocess.run([sys.executable, "-m", "dn.cli", "convert", "--out", str(out), *args], check=True)
    return str(out)


def one(model: str | None, backend: str, text: str, max_tokens: int, dtypes: list[str], steps: int) -> dict:
    """In this process: a measured load, perplexity at float32, decode latency per dtype."""
    from dn import footprint, loader
    from dn.evaluate import perplexity
    from dn.text import read_text

    rec = {}
    for dtype in dtypes:
        run = loader.load(model, backend, dtype)
        if dtype == "float32":
            tokens = run.tokenizer.encode(read_text(text))[:max_tokens]
            nll, count = perplexity(run.backend, run.model, tokens, 512)
            acc = footprint.accounted(run.spec, dtype, 512)
            rec |= {"ppl": math.exp(nll), "tokens": count, "resident_weight_bytes": acc["resident_weight_bytes"],
                    "dense_weight_bytes": acc["dense_weight_bytes"], **run.memory, "device": run.backend.device_name()}
        rec[f"decode_{dtype}"] = decode(run, steps)
        del run
    return rec


def decode(run, steps: int) -> dict:
    """Seconds per one-token step after a prefill, through the KV cache (dn.benchmark.timer)."""
    be, model = run.backend, run.model
    ids = np.array([run.tokenizer.encode(PROMPT)])
    cache = be.make_cache(model)
    be.logits(model, ids, cache, last_only=True)
    token = np.array([[int(ids[0, -1])]])
    t = benchmark.timer(lambda: be.logits(model, token, cache, last_only=True), reps=steps, warmup=2)
    return t | {"tokens_per_s": 1 / t["median_s"]}


def table(records: list[dict], bf16: int) -> str:
    dense = {r["backend"]: r for r in records if r["config"] == "dense"}
    dtypes = sorted({k.removeprefix("decode_") for r in records for k in r if k.startswith("decode_")})
    head = ("| config | backend | tokens | ppl | Δ ppl vs dense | accounted / dense bf16 | measured / dense bf16 "
            "| load peak / dense bf16 | " + " | ".join(f"decode {d} vs dense" for d in dtypes) + " |")
    lines = [head, "|" + "---|" * (8 + len(dtypes))]
    for r in records:
        d = dense.get(r["backend"])
        delta = f"{100 * (r['ppl'] / d['ppl'] - 1):+.2f}%" if d else "–"
        speed = [f"{r[f'decode_{t}']['tokens_per_s'] / d[f'decode_{t}']['tokens_per_s']:.2f}x "
                 f"({r[f'decode_{t}']['tokens_per_s']:.1f} tok/s)" if d and f"decode_{t}" in r else "–" for t in dtypes]
        lines.append(f"| {r['config']} | {r['backend']} | {r['tokens']} | {r['ppl']:.4f} | {delta} "
                     f"| {r['resident_weight_bytes'] / bf16:.1%} | {r['measured_resident_bytes'] / bf16:.1%} "
                     f"| {r['load_peak_bytes'] / bf16:.1%} | " + " | ".join(speed) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--text", required=True)
    p.add_argument("--configs", default=CONFIGS)
    p.add_argument("--backends", default="torch,mlx")
    p.add_argument("--max-tokens", default="torch:4096,mlx:1024", help="eval tokens per backend")
    p.add_argument("--dtypes", default="torch:float32+bfloat16,mlx:float32",
                   help="decode timing dtypes per backend (perplexity is float32)")
    p.add_argument("--steps", type=int, default=20, help="timed decode steps")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS of each record's process: torch's CPU kernels spin-wait, so a run that shares "
                        "the cores with another process is only comparable at one thread per process")
    p.add_argument("--work", default="out/formats", help="where converted folders are kept")
    p.add_argument("--json", required=True)
    p.add_argument("--markdown", default=None)
    p.add_argument("--one", nargs=2, metavar=("CONFIG", "BACKEND"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    tokens = dict(kv.split(":") for kv in args.max_tokens.split(","))
    dtypes = {b: d.split("+") for b, d in (kv.split(":") for kv in args.dtypes.split(","))}
    work = Path(args.work)
    if args.one:  # the fresh process of one record
        config, be = args.one
        rec = one(folder(config, work), be, args.text, int(tokens[be]), dtypes[be], args.steps)
        print(json.dumps(rec))
        return 0
    work.mkdir(parents=True, exist_ok=True)
    records = []
    for config in args.configs.split(","):
        folder(config, work)
        for be in args.backends.split(","):
            cmd = [sys.executable, __file__, "--one", config, be, *[a for a in sys.argv[1:] if a != "--one"]]
            env = os.environ | ({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout.splitlines()[-1]
            records.append({"config": config, "backend": be, **json.loads(out)})
            r = records[-1]
            print(f"{config:10s} {be:6s} ppl {r['ppl']:.4f} resident {r['resident_weight_bytes'] / 2**20:.1f} MiB "
                  f"measured {r['measured_resident_bytes'] / 2**20:.1f} MiB", file=sys.stderr)
    bf16 = records[0]["dense_weight_bytes"] // 2
    result = benchmark.report(records, ["python"] + sys.argv, dense_bf16_bytes=bf16, text=args.text,
                              threads=args.threads, loadavg=os.getloadavg())
    benchmark.write(result, args.json)
    if args.markdown:
        Path(args.markdown).write_text(table(records, bf16))
    print(table(records, bf16))
    return 0


if __name__ == "__main__":
    sys.exit(main())
