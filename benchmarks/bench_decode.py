"""torch's decode paths on one model, in one process: the per-step latency of each (interleaved, so each sees the
same load) and its quality, the mean NLL of held-out text fed one token at a time through the same path
(teacher-forced), beside the forward's over the same tokens.

- `forward`: transformers' forward with its DynamicCache, over the same loaded model (what dn ran per token
  before dn_torch/_decode.py);
- `step`: the lean step (dn_torch/_decode.py) with torch's ops between the matmuls;
- `step+c`: the same with those ops in C (dn/formats/csrc/decode.c; bfloat16, where the kernels build).

    python benchmarks/bench_decode.py [--configs q4g32e8,native] [--threads 1,2] [--text FILE] [--tokens 256]
        [--json docs/results/decode-paths.json]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dn.bench import configs, runner  # noqa: E402
from dn.bench.runner import PROMPTS  # noqa: E402
from dn.core.files import cache_dir  # noqa: E402
from dn.model.sources import resolve_model  # noqa: E402
from dn.runtime import loader, sampling, threads, timing  # noqa: E402


def paths(model) -> dict:
    """name -> (make a cache, whether the C ops run) for each path."""
    from transformers import DynamicCache  # heavy: imported on first use

    from dn_torch import model as tm

    return {"forward": (lambda: DynamicCache(config=model.config), False),
            "step": (lambda: tm.make_cache(model), False), "step+c": (lambda: tm.make_cache(model), True)}


def with_c(model, on: bool) -> None:
    from dn_torch import _decode

    model.__dict__.pop("_dn_native", None)
    if not on:
        model.__dict__["_dn_native"] = None  # the step's torch ops
    elif _decode._native(model) is None:
        raise SystemExit("bench_decode: the C steps do not run here (no compiler, DN_NATIVE=0 or not bfloat16)")


def nll(model, make, c: bool, ids: list[int], prompt: int) -> float:
    """Mean NLL of ids[prompt:], each fed one token at a time after a prompt of `prompt` tokens."""
    from dn_torch import model as tm

    with_c(model, c)
    cache = make()
    logits = tm.logits(model, np.array([ids[:prompt]]), cache, last_only=True)[0, -1]
    total = []
    for t in ids[prompt:]:
        total.append(-sampling.log_softmax(logits)[t])
        logits = tm.logits(model, np.array([[t]]), cache, last_only=True)[0, -1]
    return float(np.mean(total))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="q4g32e8,native")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--text", type=Path, default=Path.home() / ".cache/dn/text/lee_background.txt")
    p.add_argument("--tokens", type=int, default=256, help="held-out tokens scored through each path")
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    threads.setup()
    import torch  # after threads.setup, as the dn CLI loads it

    from dn_torch import model as tm

    calib = Path(os.environ["DN_CALIB_TEXT"]) if "DN_CALIB_TEXT" in os.environ else None
    sources = {"native": resolve_model(None), "dense": resolve_model(None, dense=True)}
    records, start = [], os.getloadavg()
    for cfg in configs.parse_configs(args.configs, None):
        folder = runner.folder_for(cfg, sources[cfg.source], cache_dir() / "bench", calib, "torch")
        if folder != sources[cfg.source]:
            runner.convert(cfg, sources[cfg.source], folder, calib, "torch", dict(os.environ))
        run = loader.load(str(folder), "torch", "bfloat16")
        model, ids = run.model, run.tokenizer.encode(args.text.read_text())[:args.tokens + 16]
        forward_nll = float(tm.token_nll(model, np.array([ids]))[0][15:].mean())
        prompt = run.tokenizer.encode(PROMPTS[0])
        for n in map(int, args.threads.split(",")):
            torch.set_num_threads(n)
            steps = {}
            for name, (make, c) in paths(model).items():
                with_c(model, c)
                cache, state = make(), {}
                state["next"] = int(tm.logits(model, np.array([prompt]), cache, last_only=True)[0, -1].argmax())

                def step(model=model, cache=cache, state=state, c=c):
                    with_c(model, c)
                    state["next"] = int(tm.logits(model, np.array([[state["next"]]]), cache, last_only=True)[0, -1]
                                        .argmax())
                steps[name] = step
            times = timing.interleaved(steps, args.reps, 5)
            for name in steps:
                records.append({"config": cfg.name, "path": name, "threads": n,
                                "tokens_per_s": 1 / times[name]["median_s"],
                                "latency_ms_p50": 1e3 * times[name]["median_s"],
                                "latency_ms_iqr": 1e3 * times[name]["iqr_s"],
                                "speed_vs_forward": times["forward"]["median_s"] / times[name]["median_s"]})
        for name, (make, c) in paths(model).items():
            score = nll(model, make, c, ids, 16)
            for r in records:
                if r["config"] == cfg.name and r["path"] == name:
                    r |= {"nll": score, "forward_nll": forward_nll, "scored_tokens": len(ids) - 16}
        print(*(f"{r['config']:10} {r['path']:8} {r['threads']}t {r['tokens_per_s']:6.1f} tok/s "
                f"{r['speed_vs_forward']:.2f}x  nll {r.get('nll', float('nan')):.5f}" for r in records
                if r["config"] == cfg.name), sep="\n")
    if args.json:
        result = timing.report(records, text=str(args.text), loadavg_start=start, loadavg_end=os.getloadavg())
        timing.write(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
