"""The residency frontier: budgets x modes x stores on the default model, each point in a fresh process.

    python benchmarks/bench_residency.py --text NEWS.txt --calib-text calib.txt --json OUT.json \
        [--markdown OUT.md] [--plot OUT.png] [--backends torch,mlx] [--budgets 100,60,40,30,25,20,15]

Per point: the resident weights accounted and measured by the platform (dn.runtime.memory) after the load, and resident
memory over a greedy generation (peak, median, p99: dn.runtime.memory.Monitor, sampled each token); perplexity at
float32 on the text and its delta against the same store fully resident (per-sequence mode: scored on each
window's last 3/4, its first quarter being the prompt that picks the neurons; every point also carries that
tail delta); decode tokens/s at bfloat16 (torch: its int4 kernel; one thread) with the cold file in the OS page
cache and with it dropped before every token (posix_fadvise DONTNEED: reads from the disk, standing for
flash), as ratios to the same store fully resident and to q4g32e8 fully resident, timed in the same run;
fetched bytes per token and hit rate. What the page cache holds of the cold file is not counted: it is not the
process's memory. Stores: dense (the model as shipped, bf16), q4g32e8 (mlx-lm affine 4-bit g32, 8-bit
embedding: the baseline to beat) and q4g32e8+sparse50 (sparse mode); mlx-lm's q8, q4g32 and q3g32 fully
resident for the plot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dn.core.text import read_text  # noqa: E402
from dn.model.sources import resolve_model  # noqa: E402
from dn.runtime import loader, memory, residency, timing  # noqa: E402
from dn.runtime.generation import generate_tokens, prompt_ids  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
STORES = {  # name -> dn convert flags (None: the model as shipped)
    "dense": None,
    "q4g32e8": ["-q", "--q-bits", "4", "--q-group-size", "32", "--q-embedding-bits", "8"],
    "q4g32e8+sparse50": ["-q", "--q-bits", "4", "--q-group-size", "32", "--q-embedding-bits", "8",
                         "--sparsity", "0.5"],
    "q8": ["-q", "--q-bits", "8", "--q-group-size", "64"],
    "q4g32": ["-q", "--q-bits", "4", "--q-group-size", "32"],
    "q3g32": ["-q", "--q-bits", "3", "--q-group-size", "32"],
}


# ---- one point, in its own process ------------------------------------------------------------------------

def _nll(be, model, tokens: list[int], ctx: int) -> np.ndarray:
    """Per-position NLL [windows, ctx - 1] over full windows of the text."""
    wins = [tokens[i:i + ctx] for i in range(0, len(tokens) - ctx + 1, ctx)]
    return np.concatenate([be.token_nll(model, np.array([w])) for w in wins])


def _decode(run, n: int, drop) -> dict:
    mon = memory.Monitor(run.backend, run.memory)
    ids = prompt_ids(run.tokenizer, PROMPT, False)
    if run.residency:
        run.residency.reset_counters()
    mon.reset()
    gen, tokens = generate_tokens(run.backend, run.model, ids, n), []

    def step():  # one token, then what runs between tokens (the memory read, the cold file dropped)
        tokens.append(int(next(gen)))
        mon.sample()
        if drop is not None:
            drop()

    step()  # the prefill and the first token
    if run.residency:  # reads and hits per decode step, not the prompt's
        run.residency.reset_counters()
    t = timing.timer(step, reps=n - 3, warmup=2)
    out = {"tokens_per_s": 1 / t["median_s"], "latency_ms_p50": t["median_s"] * 1e3,
           "latency_ms_p99": t["p99_s"] * 1e3, "decode_steps": t["reps"], "tokens": tokens, **mon.summary()}
    if run.residency:
        out |= run.residency.stats() | {"fetched_scope": "decode steps"}
    return out


def point(job: dict) -> dict:
    rec = {}
    for phase, dtype in (("quality", "float32"), ("speed", "bfloat16")):
        if not job[phase]:
            continue
        run = loader.load(job["folder"], job["backend"], dtype, max_resident=job["budget"], mode=job["mode"],
                          calib_text=job["calib"], prefetch=job["prefetch"])
        m = run.memory
        rec[phase] = {"dtype": dtype, "measured_resident_bytes": m["measured_resident_bytes"],
                      "measured_kind": m["measured_kind"], "load_peak_bytes": m["load_peak_bytes"],
                      **({"plan": run.residency.plan.summary()} if run.residency else {})}
        if phase == "quality":
            if run.residency:
                run.residency.prompt_tokens = job["ctx"] // residency.PROMPT_SHARE
            toks = run.tokenizer.encode(read_text(Path(job["text"])))[:job["tokens"]]
            nll = _nll(run.backend, run.model, toks, job["ctx"])
            tail = nll[:, job["ctx"] // residency.PROMPT_SHARE - 1:]
            rec[phase] |= {"nll": float(nll.mean()), "tail_nll": float(tail.mean()), "eval_tokens": int(nll.size),
                           "greedy": _decode(run, job["agree_tokens"], None)["tokens"]}
        else:
            rec[phase] |= {"cached": _decode(run, job["decode"], None)}
            if run.residency and run.residency.plan.buffer_blocks:
                rec[phase]["dropped"] = _decode(run, job["decode"], run.residency.tier.drop_cache)
        del run
    return rec


# ---- the sweep -------------------------------------------------------------------------------------------

def folder(store: str, model_dir: Path, cache: Path, calib: str, env: dict) -> Path:
    flags = STORES[store]
    if flags is None:
        return model_dir
    out = cache / store
    cache.mkdir(parents=True, exist_ok=True)
    if not (out / "config.json").is_file():
        extra = ["--calib-text", calib] if "--sparsity" in flags else []
        subprocess.run([sys.executable, "-m", "dn.cli", "convert", "--model", str(model_dir), "--out", str(out),
                        *flags, *extra, "--backend", "torch"], check=True, env=env)
    return out


def run_point(job: dict, env: dict) -> dict:
    p = subprocess.run([sys.executable, __file__, "--point", json.dumps(job)], capture_output=True, text=True,
                       env=env)
    if p.returncode:
        line = (p.stderr.strip().splitlines() or ["failed"])[-1]
        return {"error": line}
    return json.loads(p.stdout.strip().splitlines()[-1])


def native_jobs(args, folders: dict) -> list[dict]:
    """--native: a GGUF's native folder (its own blocks) fully resident and under each budget (torch: residency over
    GGUF blocks), plus the first budget with --prefetch (speed only)."""
    base = {"text": args.text, "calib": args.calib_text, "ctx": args.ctx, "decode": args.decode,
            "agree_tokens": args.agree_tokens, "prefetch": False, "store": "native", "folder": str(folders["native"]),
            "backend": "torch", "mode": "exact", "tokens": args.tokens, "quality": not args.skip_quality,
            "speed": not args.skip_speed}
    budgets = [f"{b}%" for b in args.budgets.split(",") if b != "100"]
    prefetch = [] if args.skip_speed else \
        [base | {"budget": budgets[0], "quality": False, "prefetch": True, "label": "exact+prefetch"}]
    return [base | {"budget": None}] + [base | {"budget": b} for b in budgets] + prefetch


def jobs(args, folders: dict) -> list[dict]:
    base = {"text": args.text, "calib": args.calib_text, "ctx": args.ctx, "decode": args.decode,
            "agree_tokens": args.agree_tokens, "prefetch": False}
    out = []
    for backend in args.backends.split(","):
        tokens = args.tokens if backend == "torch" else args.mlx_tokens
        speed = backend == "torch" or args.mlx_speed

        def add(store, budget, mode, backend=backend, tokens=tokens, speed=speed, **kw):
            out.append(base | {"store": store, "folder": str(folders[store]), "backend": backend, "budget": budget,
                               "mode": mode, "tokens": tokens, "quality": True, "speed": speed} | kw)

        for store in ("q8", "q4g32", "q3g32"):
            add(store, None, "exact", speed=False)
        for store in ("dense", "q4g32e8"):
            add(store, None, "exact")
        budgets = [b for b in args.budgets.split(",") if b != "100"]
        for b in budgets:
            add("q4g32e8", f"{b}%", "exact")
        for b in ("60", "40"):  # dense at bf16 holds 43% before any neuron: at 40% the planner stores it as q4g32e8
            add("dense", f"{b}%", "exact", quality=False)
        if backend == "torch":
            add("q4g32e8", "25%", "exact", quality=False, prefetch=True, label="exact+prefetch")
        for b in ("40", "25"):  # GRIFFIN-style sets lose too much on this model (docs/residency.md): two points
            add("q4g32e8", f"{b}%", "per-sequence")
        add("q4g32e8+sparse50", None, "sparse")
        for b in ("60", "40"):  # routers and priors alone hold 19% at float32: the minimum is 37%
            add("q4g32e8+sparse50", f"{b}%", "sparse")
        if backend == "mlx":  # MLX on this CPU is slow: the headline points only
            keep = {("dense", None, "exact"), ("q4g32e8", None, "exact"), ("q4g32e8", "25%", "exact"),
                    ("q4g32e8", "40%", "exact"), ("q4g32e8", "25%", "per-sequence")}
            out[:] = [j for j in out if j["backend"] != "mlx" or (j["store"], j["budget"], j["mode"]) in keep]
    return out


def relate(records: list[dict]) -> None:
    """Deltas and ratios against the same store fully resident, and q4g32e8 fully resident, same backend."""
    def find(store, backend):
        return next((r for r in records if r["store"] == store and r["backend"] == backend and r["budget"] is None
                     and "error" not in r), None)

    plans = [ph["plan"] for r in records for ph in (r.get("quality"), r.get("speed")) if ph and "plan" in ph]
    model_bf16 = plans[0]["dense_bf16"] if plans else None  # one model: every record's fraction is of it
    for r in records:
        if "error" in r:
            continue
        base = find(r["store"], r["backend"])
        q4 = find("q4g32e8", r["backend"])
        dense = find("dense", r["backend"])
        q = r.get("quality")
        if q:
            r["ppl"] = math.exp(q["nll"])
        if q and dense and dense.get("quality"):
            r["ppl_delta_pct"] = 100 * (math.exp(q["nll"] - dense["quality"]["nll"]) - 1)
            r["tail_ppl_delta_pct"] = 100 * (math.exp(q["tail_nll"] - dense["quality"]["tail_nll"]) - 1)
        if q and base and base.get("quality"):
            r["ppl_delta_vs_store_pct"] = 100 * (math.exp(q["nll"] - base["quality"]["nll"]) - 1)
            r["same_tokens_as_store"] = q["greedy"] == base["quality"]["greedy"]
        s = r.get("speed")
        if s:
            for key in ("cached", "dropped"):
                if key in s:
                    if base and base.get("speed"):
                        s[key]["speed_vs_store"] = s[key]["tokens_per_s"] / base["speed"]["cached"]["tokens_per_s"]
                    if q4 and q4.get("speed"):
                        s[key]["speed_vs_q4g32e8"] = s[key]["tokens_per_s"] / q4["speed"]["cached"]["tokens_per_s"]
        ph = s or q
        dense_bf16 = model_bf16
        if dense_bf16:
            r["measured_fraction"] = ph["measured_resident_bytes"] / dense_bf16
            if s:
                r["peak_fraction"] = s["cached"]["resident_peak_bytes"] / dense_bf16
                r["median_fraction"] = s["cached"]["resident_median_bytes"] / dense_bf16


def _f(x, fmt="{:.1f}%", scale=100):
    return "–" if x is None else fmt.format(x * scale)


def table(records: list[dict]) -> str:
    head = ("| backend | store | mode | budget | measured resident (load / gen. peak / median) | Δppl vs dense "
            "(tail) | decode vs same store, cached / dropped | vs q4g32e8 cached | read per token, measured | "
            "cold per decode step, planned | hit rate |")
    lines = [head, "|" + "---|" * 11]
    for r in records:
        name = f"| {r['backend']} | {r['store']} | {r.get('label', r['mode'])} | {r['budget'] or 'all'} |"
        if "error" in r:
            lines.append(f"{name} {r['error']} | | | | | | |")
            continue
        s = r.get("speed") or {}
        c, d = s.get("cached", {}), s.get("dropped", {})
        mem = " / ".join(_f(r.get(k)) for k in ("measured_fraction", "peak_fraction", "median_fraction"))
        dppl = f"{_f(r.get('ppl_delta_pct'), '{:+.2f}%', 1)} ({_f(r.get('tail_ppl_delta_pct'), '{:+.2f}%', 1)})"
        sp = f"{_f(c.get('speed_vs_store'), '{:.2f}x', 1)} / {_f(d.get('speed_vs_store'), '{:.2f}x', 1)}"
        fetched = c.get("fetched_bytes_per_token")
        scope = c.get("fetched_scope", "prompt and decode tokens")
        plan = s.get("plan")
        cold = None if not plan or r["mode"] != "exact" else \
            sum(plan["blocks"] - h for h in plan["hot"]) * plan["block_bytes"]
        lines.append(f"{name} {mem} | {dppl} | {sp} | {_f(c.get('speed_vs_q4g32e8'), '{:.2f}x', 1)} | "
                     f"{'–' if fetched is None else f'{fetched / 2**20:.1f} MiB ({scope})'} | "
                     f"{'–' if cold is None else f'{cold / 2**20:.1f} MiB'} | {_f(c.get('hit_rate'))} |")
    return "\n".join(lines) + "\n"


def native_table(records: list[dict]) -> str:
    """--native: each budget against the same GGUF fully resident (exact mode: the same model)."""
    mib = lambda b: "–" if b is None else f"{b / 2**20:.1f}"
    lines = ["| budget | mode | measured resident MiB (load / gen. peak / median) | % of dense bf16 (gen. peak) | "
             "ppl (Δ vs all resident) | same greedy tokens | decode tok/s cached (vs all) | dropped (vs all) | "
             "read per decode step | hit rate |", "|" + "---|" * 10]
    for r in records:
        name = f"| {r['budget'] or 'all'} | {r.get('label', r['mode'])} |"
        if "error" in r:
            lines.append(f"{name} {r['error']} |" + " |" * 7)
            continue
        s, q = r.get("speed") or {}, r.get("quality") or {}
        c, d = s.get("cached", {}), s.get("dropped", {})
        ph = s or q
        mem = " / ".join(mib(x) for x in (ph.get("measured_resident_bytes"), c.get("resident_peak_bytes"),
                                           c.get("resident_median_bytes")))
        ppl = "–" if "ppl" not in r else \
            f"{r['ppl']:.3f} ({_f(r.get('ppl_delta_vs_store_pct'), '{:+.3f}%', 1)})"
        speed = lambda x: "–" if not x else f"{x['tokens_per_s']:.2f} ({_f(x.get('speed_vs_store'), '{:.2f}x', 1)})"
        fetched = c.get("fetched_bytes_per_token")
        lines.append(f"{name} {mem} | {_f(r.get('peak_fraction'))} | {ppl} | {r.get('same_tokens_as_store', '–')} | "
                     f"{speed(c)} | {speed(d)} | {mib(fetched)} MiB | {_f(c.get('hit_rate'))} |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: str) -> None:
    import matplotlib  # optional (--plot): late, so the sweep needs no matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed

    fig, ax = plt.subplots(figsize=(7, 4.5))
    marks = {"exact": "o", "per-sequence": "s", "sparse": "^"}
    for r in records:
        if "error" in r or r.get("ppl_delta_pct") is None or r["backend"] != "torch":
            continue
        x = r.get("measured_fraction")
        y = r["tail_ppl_delta_pct"] if r["mode"] == "per-sequence" else r["ppl_delta_pct"]
        base = r["budget"] is None and r["store"] in ("q8", "q4g32", "q3g32", "q4g32e8", "dense")
        ax.scatter(100 * x, max(y, 1e-3), marker="x" if base else marks[r["mode"]], color="k" if base else None)
        ax.annotate(r["store"] if base else f"{r['mode']} {r['budget']}", (100 * x, max(y, 1e-3)), fontsize=6)
    ax.set_xlabel("resident weights, % of dense bf16 (measured after the load)")
    ax.set_ylabel("perplexity delta vs dense, % (log)")
    ax.set_yscale("log")
    ax.axhline(1, ls=":", color="grey")
    ax.axvline(25, ls=":", color="grey")
    ax.set_title("Residency frontier, SmolLM2-135M, torch CPU\n(x: mlx-lm formats fully resident)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--point", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None)
    p.add_argument("--text", default=None)
    p.add_argument("--calib-text", default=os.environ.get("DN_CALIB_TEXT"))
    p.add_argument("--backends", default="torch,mlx")
    p.add_argument("--budgets", default="100,60,40,30,25,20,15")
    p.add_argument("--tokens", type=int, default=8192, help="evaluation tokens on torch")
    p.add_argument("--mlx-tokens", type=int, default=1024)
    p.add_argument("--mlx-speed", action="store_true", help="also time MLX decode (its CPU build: not MLX speed)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--agree-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "dn" / "bench-residency"))
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--from-json", default=None, help="write --markdown/--plot from an earlier run's JSON")
    p.add_argument("--native", action="store_true",
                   help="the model's native GGUF folder fully resident and under --budgets (torch), not the stores")
    p.add_argument("--skip-quality", action="store_true", help="--native: speed and memory only")
    p.add_argument("--skip-speed", action="store_true", help="--native: quality and load memory only")
    args = p.parse_args()
    if args.from_json:
        records = json.loads(Path(args.from_json).read_text())["records"]
        relate(records)
        return outputs(records, args)
    if args.point:
        print(json.dumps(point(json.loads(args.point))))
        return 0

    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if args.native:
        folders = {"native": resolve_model(args.model)}
        todo = native_jobs(args, folders)
    else:
        model_dir = resolve_model(args.model, dense=True)  # every store is converted from the dense form
        folders = {s: folder(s, model_dir, Path(args.cache), args.calib_text, env) for s in STORES}
        todo = jobs(args, folders)
    records = []
    for i, job in enumerate(todo):
        print(f"[{i + 1}/{len(todo)}] {job['backend']} {job['store']} {job['mode']} {job['budget']}", file=sys.stderr)
        records.append({k: job[k] for k in ("backend", "store", "mode", "budget")} |
                       ({"label": job["label"]} if "label" in job else {}) | run_point(job, env))
        relate(records)
        result = timing.report(records, threads=args.threads, text=Path(args.text).name, model=args.model,
                               native=args.native, loadavg=os.getloadavg())
        if args.json:
            timing.write(result, args.json)
    return outputs(records, args)


def outputs(records: list[dict], args) -> int:
    text = native_table(records) if args.native else table(records)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.plot and not args.native:
        plot(records, args.plot)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
