"""Decode-loop overhead at batch 1: how much of a decode step is weight reading, how much is everything else
(Python, op dispatch, small ops), and what the stacks' compilers give back.

    python benchmarks/bench_overhead.py [--model M] [--dtype bfloat16] [--steps 16] [--backends torch,mlx]
        [--modes default] [--json docs/results/overhead-cpu.json]

torch, one process, one thread (--threads):
- `eager`: the step dn runs today (transformers' DynamicCache, dn.bench.runner.Greedy);
- `linears`: every Linear of the model (lm_head included) applied once to a random vector: the weight-reading
  floor as torch's own matvecs do it; `bytes / bandwidth`: the weights' bytes over the read bandwidth measured here
  (a sum over a 256 MiB float32 buffer);
- the profiler over one eager step: aten ops per step and their self time by kind;
- `static`: transformers' StaticCache, eager; `compiled[MODE]`: the same step under torch.compile (inductor, a C
  compiler on the CPU), compile time apart. Greedy tokens of each are compared with eager's and static's (bf16
  rounding differs between the two caches' attention, so free-running tokens may part after a while).
MLX (when installed and it runs): its eager step and the same step with each layer's MLP and norms under
mx.compile (mlx-lm's KV cache keeps the offset as a Python int, so the whole step cannot be traced as one).
All speeds in one run; ratios against eager; JSON through dn.runtime.timing.report.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dn.bench.runner import PROMPTS, Greedy, agreement  # noqa: E402
from dn.runtime import backend as backends  # noqa: E402
from dn.runtime import loader, timing  # noqa: E402


def _interleaved(steps: dict, reps: int, warmup: int) -> dict:
    """dn.runtime.timing.interleaved, as this script's records."""
    return {k: {"latency_ms_p50": 1e3 * t["median_s"], "latency_ms_iqr": 1e3 * t["iqr_s"],
                "tokens_per_s": 1 / t["median_s"], "reps": reps, "warmup": warmup}
            for k, t in timing.interleaved(steps, reps, warmup).items()}


def torch_records(model_arg, dtype: str, reps: int, warmup: int, modes: list[str]) -> list[dict]:
    import torch  # the torch backend's records only: this machine may have MLX alone
    from torch.profiler import ProfilerActivity, profile
    from transformers import StaticCache

    run = loader.load(model_arg, "torch", dtype)
    be, model = run.backend, run.model
    prompt = run.tokenizer.encode(PROMPTS[0])
    length = len(prompt) + 2 * (warmup + reps) + 8

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    xs = [torch.randn(1, 1, m.in_features, dtype=m.weight.dtype) for m in linears]

    @torch.inference_mode()
    def all_linears():
        for m, x in zip(linears, xs):
            m(x)

    buf = torch.ones(64 << 20, dtype=torch.float32)

    def static(forward):
        """A greedy step through transformers' StaticCache (fixed shapes: what torch.compile wants)."""
        cache = StaticCache(config=model.config, max_cache_len=length)
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([prompt]), cache=cache, use_cache=True, logits_to_keep=1).logits
        state = {"next": logits[:, -1].argmax(-1), "pos": len(prompt), "tokens": []}

        @torch.inference_mode()
        def step():
            state["tokens"].append(int(state["next"][0]))
            pos = torch.tensor([[state["pos"]]])
            out = forward(input_ids=state["next"][:, None], position_ids=pos, cache=cache, use_cache=True,
                          logits_to_keep=1).logits
            state["next"] = out[:, -1].argmax(-1)
            state["pos"] += 1

        return step, state

    eager = Greedy(be, model, [prompt])
    steps = {"eager": eager.step, "linears": all_linears, "read 256 MiB": lambda: buf.sum()}
    states, extra = {}, {}
    steps["static"], states["static"] = static(model)
    for mode in modes:
        name = f"compiled[{mode}]"
        steps[name], states[name] = static(torch.compile(model.forward, mode=None if mode == "default" else mode))
        t0 = time.perf_counter()
        steps[name]()  # the first call compiles
        steps[name]()  # and the second, if the first specialized on its position
        extra[name] = {"compile_s": time.perf_counter() - t0}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        eager.step()
    t = _interleaved(steps, reps, warmup)

    base = t["eager"]["latency_ms_p50"]
    bandwidth = buf.numel() * 4 / (t["read 256 MiB"]["latency_ms_p50"] / 1e3)
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)
    mm = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::mv"))
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
    out = [{"what": "eager", **t["eager"], "weight_bytes": weight_bytes},
           {"what": "linears", **t["linears"], "linears": len(linears), "weight_bytes": weight_bytes,
            "share_of_eager": t["linears"]["latency_ms_p50"] / base},
           {"what": "bytes / bandwidth", "read_bandwidth_gb_s": bandwidth / 1e9,
            "latency_ms_p50": 1e3 * weight_bytes / bandwidth, "share_of_eager": 1e3 * weight_bytes / bandwidth / base},
           {"what": "profile (one eager step)", "aten_calls": sum(e.count for e in events),
            "matmul_self_share": mm / total if total else None,
            "top_self_ms": {e.key: e.self_cpu_time_total / 1e3 for e in top}}]
    for name, state in states.items():
        out.append({"what": name, **t[name], **extra.get(name, {}), "vs_eager": base / t[name]["latency_ms_p50"],
                    "greedy_tokens": len(state["tokens"]),
                    "greedy_agreement_vs_eager": agreement(state["tokens"], eager.tokens[0]),
                    "greedy_agreement_vs_static": agreement(state["tokens"], states["static"]["tokens"])})
    return [{"backend": "torch", "dtype": dtype, **r} for r in out]


def mlx_records(model_arg, dtype: str, reps: int, warmup: int) -> list[dict]:
    import mlx.core as mx  # the MLX backend's records only

    run = loader.load(model_arg, "mlx", dtype)
    be, model = run.backend, run.model
    prompt = run.tokenizer.encode(PROMPTS[0])
    on = {"compiled": False}
    for layer in model.model.layers:  # pure functions of their input: traced once, replayed per call
        for name in ("mlp", "input_layernorm", "post_attention_layernorm"):
            fn = getattr(layer, name)
            object.__setattr__(layer, name, _Switch(fn, mx.compile(fn), on))
    eager, compiled = Greedy(be, model, [prompt]), None

    def compiled_step():
        on["compiled"] = True
        try:
            compiled.step()
        finally:
            on["compiled"] = False

    on["compiled"] = True
    t0 = time.perf_counter()
    compiled = Greedy(be, model, [prompt])
    compiled.step()
    compile_s = time.perf_counter() - t0
    on["compiled"] = False
    t = _interleaved({"eager": eager.step, "compiled[mlp+norms]": compiled_step}, reps, warmup)
    return [{"backend": "mlx", "dtype": dtype, "what": "eager", **t["eager"]},
            {"backend": "mlx", "dtype": dtype, "what": "compiled[mlp+norms]", **t["compiled[mlp+norms]"],
             "compile_s": compile_s, "vs_eager": t["eager"]["latency_ms_p50"] / t["compiled[mlp+norms]"][
                 "latency_ms_p50"], "greedy_agreement_vs_eager": agreement(compiled.tokens[0], eager.tokens[0])}]


class _Switch:
    """A module's compiled call in its place while on["compiled"], else the module's own (other attributes read
    through)."""

    def __init__(self, module, fn, on: dict):
        self.module, self.fn, self.on = module, fn, on

    def __call__(self, *args, **kwargs):
        return (self.fn if self.on["compiled"] else self.module)(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.module, name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=16, help="timed decode steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backends", default="torch,mlx")
    p.add_argument("--modes", default="default", help="torch.compile modes, e.g. default,max-autotune-no-cudagraphs")
    p.add_argument("--json", default=str(ROOT / "docs" / "results" / "overhead-cpu.json"))
    args = p.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    records = []
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        if backend == "torch":
            import torch  # after OMP_NUM_THREADS is set, and only when torch is timed

            torch.set_num_threads(args.threads)
            records += torch_records(args.model, args.dtype, args.steps, args.warmup,
                                     [m for m in args.modes.split(",") if m])
        elif backend == "mlx":
            if not backends.get("mlx").is_available():
                records.append({"backend": "mlx", "error": "mlx does not run here"})
                continue
            records += mlx_records(args.model, args.dtype, args.steps, args.warmup)
        timing.write(timing.report(records, ["python", "benchmarks/bench_overhead.py", *(argv or sys.argv[1:])],
                                   threads=args.threads, loadavg=os.getloadavg()), args.json)
    for r in records:
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
