"""1 against 2 CPU threads (torch) on every weight path of the default model: dense (the GGUF's widening), native
(its GGUF blocks), q4g32e8 (`dn convert -q`), lossless and sparse50, batch-1 decode and a short prefill, `--dtype
auto` as `dn generate` runs them.

Each path runs in its own process; inside it, calls at 1 and at 2 threads alternate (torch.set_num_threads before
each, dn.runtime.timing.interleaved), so both counts see the same load from the other processes on these cores.
OpenMP policies (POLICIES), one process each: `dn` (dn.runtime.threads.setup before torch loads, what the dn CLI
and loader set: OMP_WAIT_POLICY=PASSIVE where the cores are busy, else OpenMP's own), `spin` (OpenMP's own
default), `short` and `medium` (a shorter spin, then sleep). The load average and the policy each process ran are
recorded.

    DN_CALIB_TEXT=... python benchmarks/bench_threads.py --json docs/results/threads.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from dn.bench import configs, runner
from dn.core.files import cache_dir
from dn.model.sources import resolve_model
from dn.runtime import loader, threads, timing

# name -> environment before torch loads: `dn` is what dn sets (dn.runtime.threads.setup: PASSIVE on busy cores,
# else OpenMP's own), `spin` OpenMP's default (idle threads spin a while, then sleep), `short` and `medium` a shorter
# spin (GOMP_SPINCOUNT: libgomp's iterations) then sleep.
POLICIES = {"dn": {}, "spin": {}, "short": {"GOMP_SPINCOUNT": "1000"}, "medium": {"GOMP_SPINCOUNT": "30000"}}


def child(job: dict) -> dict:
    os.environ.update(POLICIES[job["policy"]])
    if job["policy"] == "dn":
        threads.setup()
    import torch  # late: after the policy's environment, which OpenMP reads once, when torch loads it
    # (loader.load's threads.setup() is then a no-op: the spin policy stays spin)

    run = loader.load(job["folder"], "torch", "auto")
    prompt = run.tokenizer.encode(runner.PROMPTS[0])
    g = runner.Greedy(run.backend, run.model, [prompt])
    prefill = np.array([(prompt * 8)[:job["prefill_tokens"]]])

    def at(n, fn):
        def call():
            torch.set_num_threads(n)
            fn()
        return call

    load0 = os.getloadavg()
    dec = timing.interleaved({n: at(n, g.step) for n in (1, 2)}, reps=job["reps"], warmup=3)
    pre = timing.interleaved({n: at(n, lambda: run.backend.logits(run.model, prefill, run.backend.make_cache(
        run.model), last_only=True)) for n in (1, 2)}, reps=job["prefill_reps"], warmup=1)
    return {"config": job["config"], "policy": job["policy"], "dtype": run.dtype,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
            **{f"decode_tokens_per_s_{n}": 1 / dec[n]["median_s"] for n in (1, 2)},
            **{f"decode_iqr_ms_{n}": 1e3 * dec[n]["iqr_s"] for n in (1, 2)},
            "decode_ratio_2_over_1": dec[1]["median_s"] / dec[2]["median_s"],
            **{f"prefill_tokens_per_s_{n}": prefill.size / pre[n]["median_s"] for n in (1, 2)},
            "prefill_ratio_2_over_1": pre[1]["median_s"] / pre[2]["median_s"],
            "decode_reps": job["reps"], "prefill_tokens": prefill.size, "prefill_reps": job["prefill_reps"],
            "loadavg_start": load0, "loadavg_end": os.getloadavg()}


def _settle(limit_s: float) -> bool:
    """Wait up to limit_s for idle cores (not dn.runtime.threads.busy()); whether they were idle."""
    end = time.monotonic() + limit_s
    while threads.busy() and time.monotonic() < end:
        time.sleep(2)
    return not threads.busy()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="dense,native,q4g32e8,lossless,sparse50")
    p.add_argument("--policies", default="dn,spin", help=f"of {', '.join(POLICIES)}")
    p.add_argument("--reps", type=int, default=24, help="decode steps at each thread count")
    p.add_argument("--prefill-tokens", type=int, default=64)
    p.add_argument("--prefill-reps", type=int, default=5)
    p.add_argument("--json", default=None)
    p.add_argument("--settle", type=float, default=180.0,
                   help="seconds to wait, before each process, for the cores to be idle (the load average to fall "
                        "under half of them: the last process's own load counts), as a user's run starts")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(child(json.loads(args.one))))
        return 0
    calib = Path(os.environ["DN_CALIB_TEXT"]) if os.environ.get("DN_CALIB_TEXT") else None
    sources = {"native": resolve_model(None), "dense": resolve_model(None, dense=True)}
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    records, start = [], os.getloadavg()
    for c in configs.parse_configs(args.configs, None):
        folder = runner.folder_for(c, sources[c.source], cache_dir() / "bench", calib, "torch")
        if folder != sources[c.source]:
            runner.convert(c, sources[c.source], folder, calib, "torch", env)
        for policy in args.policies.split(","):
            job = {"config": c.name, "folder": str(folder), "policy": policy, "reps": args.reps,
                   "prefill_tokens": args.prefill_tokens, "prefill_reps": args.prefill_reps}
            settled = _settle(args.settle)
            out = subprocess.run([sys.executable, __file__, "--one", json.dumps(job)], env=env, check=True,
                                 capture_output=True, text=True).stdout
            records.append(json.loads(out.strip().splitlines()[-1]) | {"idle_at_start": settled})
            r = records[-1]
            print(f"{c.name:9} {policy:5} {r['dtype']:9} decode 1: {r['decode_tokens_per_s_1']:6.1f} 2: "
                  f"{r['decode_tokens_per_s_2']:6.1f} tok/s ({r['decode_ratio_2_over_1']:.2f}x); prefill "
                  f"{r['prefill_ratio_2_over_1']:.2f}x; load {r['loadavg_start'][0]:.2f}", flush=True)
    if args.json:
        timing.write(timing.report(records, ["python", *sys.argv], loadavg_start=start, loadavg_end=os.getloadavg(),
                                   physical_cores=threads.physical_cores()), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
