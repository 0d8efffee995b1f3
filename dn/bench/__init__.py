"""`dn bench`: weight configurations x backends on one model, against dense measured in the same run.

    dn bench [--model M] --text FILE [--configs dense,native,q4g32,lossless,sparse50] [--backends mlx,torch]
             [--dtypes bfloat16] [--batch 1,4] [--max-resident 25%,50%] [--skip ppl,agreement] --json OUT
             [--markdown OUT.md] [--plot OUT.png] [--peers llama.cpp,mlx-lm] [--ppl-scoring auto|all|second-half]

A configuration is `FORMAT[+sparseNN][@BUDGET]`, named the same on both backends (configs.py: `q4g32e8`,
`lossless+sparse50@25%`); dense is the model's dense form (a GGUF's bf16 widening), native the model as it loads by
default (a GGUF's own blocks), every other format converted from dense; sparse configurations are fitted on
--calib-text; `--max-resident LIST` adds every budget to every configuration. Each (configuration, backend,
dtype) runs in a fresh process (runner.py: the figures of a record, the folders converted once into the dn cache);
report.py relates each record to dense measured in the same run and writes the table and plot; humaneval.py is
`--tasks humaneval`. `--peers` adds the tools a user would run instead (peers.py: llama.cpp on the model's GGUF,
mlx-lm on a folder of the same weights) on the same text, context and threads, their records in the same list, with
dn's perplexity scored as llama-perplexity scores (`ppl_scoring`). JSON shape: dn.runtime.timing.report.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from tqdm import tqdm

from dn import cli
from dn.bench import configs, humaneval, peers, report, runner
from dn.core.errors import DnError
from dn.core.files import cache_dir
from dn.core.text import read_text, text_path
from dn.model.sources import resolve_model
from dn.model.spec import load_spec
from dn.runtime import backend as backends
from dn.runtime import threads, timing


def setup_arg_parser():
    p = cli.ArgumentParser(prog="dn bench", description="Weight configurations x backends against dense: memory, "
                                                         "quality, speed.")
    p.add_argument("--model", default=None, help="model folder, .gguf or Hub repo id (default: embedded)")
    p.add_argument("--text", default=None, help="evaluation text (default: $DN_EVAL_TEXT)")
    p.add_argument("--configs", default=configs.DEFAULT_CONFIGS,
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
                        "prompt only; the other prompts are not run), dense (no dense record: no ratios against it)")
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
    p.add_argument("--plot", default=None, help="PNG: resident fraction against ppl delta and tokens/s (with --peers: "
                                                "ppl and tokens/s against the process peak above its baseline)")
    p.add_argument("--peers", default="", help="also run these on the same model file, text, ctx and threads: "
                                                  "llama.cpp (the GGUF), mlx-lm (--mlx-lm-folder)")
    p.add_argument("--ppl-scoring", default="auto", choices=["auto", "all", "second-half"],
                   help="dn's perplexity: every token of each window (all), or only each window's second half, as "
                        "llama-perplexity scores (auto: second-half when llama.cpp is a peer)")
    p.add_argument("--peer-reps", type=cli.positive_int, default=5, help="llama-bench repetitions per test")
    p.add_argument("--mlx-lm-folder", default=None,
                   help="the folder mlx-lm runs (default: the model's dense form, a GGUF's bf16 widening)")
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
    argv = sys.argv[1:] if argv is None else list(argv)
    args = setup_arg_parser().parse_args(argv)
    if args.one:
        return runner.one(args.one)
    if not args.json:
        raise DnError("--json OUT is required")
    # everything a user can get wrong, before any work
    cfgs = configs.parse_configs(args.configs, args.max_resident)
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not names or len(set(names)) != len(names):
        raise DnError(f"--backends {args.backends!r}: name each backend once")
    for name in names:
        backends.get(name)
    try:
        batches = sorted({configs.positive_count(b) for b in args.batch.split(",")})
    except ValueError:
        raise DnError(f"--batch {args.batch!r}: expected positive integers, e.g. 1,4") from None
    dtypes = configs.keyed(args.dtypes, "--dtypes", configs.dtype_list)
    decode = configs.keyed(args.decode_tokens, "--decode-tokens", configs.positive_count)
    max_tokens = configs.keyed(args.max_tokens, "--max-tokens", configs.positive_count)
    known = {k for c in cfgs for k in (c.name, c.stored, c.fmt)} | set(backends.BACKENDS)
    for flag, table_ in (("--dtypes", dtypes), ("--decode-tokens", decode), ("--max-tokens", max_tokens)):
        for key in table_:
            if key and key not in known:
                raise DnError(f"{flag}: {key!r} names neither a config nor a backend of this run")
    if set(max_tokens) - {"", *backends.BACKENDS}:
        raise DnError("--max-tokens is per backend only (a perplexity delta needs dense on the same tokens)")
    tasks = configs.name_list(args.tasks, configs.TASKS, "unknown task")
    if tasks:
        humaneval.problems(1)
    skip = configs.name_list(args.skip, configs.SKIPS, "--skip: unknown phase")
    if "dense" in skip:
        cfgs = [c for c in cfgs if c.name != "dense"]
        if not cfgs:
            raise DnError("--skip dense leaves no config to run")
    peer_names = configs.name_list(args.peers, peers.PEERS, "--peers: unknown peer")
    scoring = args.ppl_scoring if args.ppl_scoring != "auto" else \
        "second-half" if "llama.cpp" in peer_names else "all"
    text = text_path(args.text, "DN_EVAL_TEXT")
    read_text(text)
    calib = None
    if any(c.sparsity for c in cfgs):
        calib = text_path(args.calib_text, "DN_CALIB_TEXT")
        read_text(calib)
        if _same_file(calib, text):
            raise DnError("the calibration text is the evaluation text (fit sparse configs on other text)")
    for path in (args.json, args.markdown, args.plot):
        _check_out(path)
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (optional: only --plot needs it, checked before any work)
        except ImportError:
            raise DnError("--plot needs matplotlib (pip install matplotlib)") from None

    env = os.environ | ({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})
    sources = {}  # Config.source -> folder: the model as it loads by default, and its dense form
    if any(c.source == "native" for c in cfgs):
        sources["native"] = resolve_model(args.model)
        if load_spec(sources["native"]).gguf:
            cfgs, left = configs.over_gguf(cfgs, {t.strip() for t in args.configs.split(",")})
            if left:
                print(f"dn bench: --max-resident leaves out {', '.join(left)} (residency plans over dense or "
                      "affine weights, not over a GGUF's blocks yet)", file=sys.stderr)
    if any(c.source == "dense" for c in cfgs) or ("mlx-lm" in peer_names and not args.mlx_lm_folder):
        sources["dense"] = resolve_model(args.model, dense=True)  # a GGUF's widening: made only when run
    mlx_folder = Path(args.mlx_lm_folder).expanduser() if args.mlx_lm_folder else sources.get("dense")
    mlx_weights = "given by --mlx-lm-folder" if args.mlx_lm_folder else \
        "the model's dense form (a GGUF's bf16 widening: mlx-lm does not read GGUF blocks)"
    plans = peers.prepare(peer_names, args.model, mlx_folder, log=lambda m: print(f"dn bench: {m}", file=sys.stderr))
    for name, plan in plans.items():
        if "skipped" in plan:
            print(f"dn bench: {name} skipped: {plan['skipped']}", file=sys.stderr)
    root = Path(args.cache).expanduser() if args.cache else cache_dir() / "bench"
    folders = {c.stored: runner.folder_for(c, sources[c.source], root, calib, args.calib_backend) for c in cfgs}
    jobs = []
    for be in names:
        for dtype in dict.fromkeys(d for c in cfgs for d in configs.pick(dtypes, c, be, "--dtypes")):
            for c in cfgs:
                if c is cfgs[0] or dtype in configs.pick(dtypes, c, be):  # dense: the baseline of every dtype
                    jobs.append({"config": c.name, "stored": c.stored, "budget": c.budget, "backend": be,
                                 "dtype": dtype, "folder": str(folders[c.stored]), "text": str(text),
                                 "max_tokens": configs.pick(max_tokens, c, be, "--max-tokens"), "ctx": args.ctx,
                                 "batches": batches, "decode_reps": configs.pick(decode, c, be, "--decode-tokens"),
                                 "warmup": args.warmup, "skip": skip, "ppl_scoring": scoring,
                                 "prefill_tokens": args.prefill_tokens, "prefill_reps": args.prefill_reps})
    command = ["dn", "bench", *argv]
    extra = {"model": str(args.model or sources.get("dense") or sources["native"]), "text": str(text),
             "threads": args.threads, "peers": peer_names, "ppl_scoring": scoring, "ppl_scorings": peers.PPL_SCORINGS,
             "loadavg_start": os.getloadavg()}
    records, baseline = [], {}
    with cli.progress(len(jobs) + len(folders) + len(plans), "dn bench", "run") as bar:
        for c in cfgs:
            if folders[c.stored] != sources[c.source]:
                bar.set_postfix_str(f"convert {c.stored}")
                runner.convert(c, sources[c.source], folders[c.stored], calib, args.calib_backend, env)
            bar.update()
        for job in jobs:
            key = (job["backend"], job["dtype"])
            job["baseline_tokens"] = None if job["config"] == "dense" else baseline.get(key, {}).get("tokens")
            job["humaneval"] = None
            if "humaneval" in tasks:
                job["humaneval"] = {"limit": args.humaneval_limit, "max_tokens": args.humaneval_tokens,
                                    "baseline_tokens": None if job["config"] == "dense"
                                    else baseline.get(key, {}).get("humaneval_tokens")}
            out = runner.run_job(job, env, bar)
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
            report.relate(records)
            timing.write(timing.report(records, command, **extra, complete=False), args.json)
            bar.update()
        for name, plan in plans.items():
            bar.set_postfix_str(name)
            try:
                records += peers.run(name, plan, text, args.ctx, threads.count(args.threads),
                                     decode.get("", configs.pick(decode, cfgs[0], names[0])), args.prefill_tokens,
                                     args.peer_reps, configs.pick(max_tokens, cfgs[0], names[0]), skip, mlx_weights)
            except DnError as e:
                tqdm.write(f"dn bench: {name} failed: {e}", file=sys.stderr)
                records.append({"backend": name, "config": "failed", "batch": 1, "error": str(e)})
            timing.write(timing.report(records, command, **extra, complete=False), args.json)
            bar.update()
    result = timing.report(records, command, **extra, loadavg_end=os.getloadavg(), complete=True)
    timing.write(result, args.json)
    ours = [r for r in records if r["backend"] not in peers.PEERS]
    label = str((plans.get("llama.cpp") or {}).get("gguf") or args.model or "default")  # dn's rows: the same file
    md = report.table(ours) + ("\n" + report.peer_table(records, label) if plans else "")
    if args.markdown:
        Path(args.markdown).write_text(md)
    if args.plot:
        (report.peer_plot if plans else report.plot)(records if plans else ours, args.plot)
    print(md, end="")
    return 1 if any("error" in r for r in records) else 0


def main(argv=None) -> int:
    return cli.run(_main, argv)
