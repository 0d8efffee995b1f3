"""What a pipeline hop costs (docs/distributed.md): one-way loopback latency of a decode step's hidden state and of
the logits handed back, through the backend's own transport (torch.distributed gloo under torchrun), and the default
model's tokens/s on two local ranks against one process, in the same run, and each rank's measured resident weights
against one rank's (RUNS: both backends, the default model and Gemma 3 270M, and per-rank budgets).

    python benchmarks/bench_pipeline.py [--out docs/results/pipeline.json] [--tokens 32]

The hop is timed by ping-pong (two ranks, dn.runtime.timing's timer, half the round trip)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from dn.model import store
from dn.model.sources import resolve_model
from dn.model.spec import load_spec
from dn.runtime import backend as backends
from dn.runtime import timing


def hop(out: str) -> None:
    """Under torchrun: rank 0 and 1 bounce messages of each size; rank 0 writes the one-way medians."""
    be = backends.get("torch")
    group = be.pipeline.connect(60)
    rank = be.pipeline.rank(group)
    spec = load_spec(resolve_model(None))
    sizes = {"hidden_bf16_1_token": (1, 1, spec.architecture.hidden_size), "hidden_bf16_32_tokens":
             (1, 32, spec.architecture.hidden_size), "logits_f32": (1, 1, spec.architecture.vocab_size)}
    import torch  # heavy, and only the ranks' own run needs it: the messages are the transport's tensors

    rows = []
    for name, shape in sizes.items():
        x = torch.zeros(shape, dtype=torch.float32 if name.startswith("logits") else torch.bfloat16)
        dtype = "float32" if x.dtype == torch.float32 else "bfloat16"

        def bounce(x=x, shape=shape, dtype=dtype):
            if rank == 0:
                be.pipeline.send(group, x, 1)
                be.pipeline.recv(group, shape, dtype, 1)
            else:
                be.pipeline.recv(group, shape, dtype, 0)
                be.pipeline.send(group, x, 0)

        t = timing.timer(bounce, reps=200, warmup=20)
        rows.append({"message": name, "shape": list(shape), "bytes": int(x.numel() * x.element_size()),
                     "one_way_median_s": t["median_s"] / 2, "one_way_p99_s": t["p99_s"] / 2, "reps": t["reps"]})
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    be.pipeline.close(group)


def _rank(line: str) -> dict:
    """A `rank N:` stats line -> its rank, layers and measured resident MiB, and the line."""
    m = re.match(r"rank (\d+): layers (\d+)-(\d+) .*?resident ([\d.]+) MiB measured", line)
    return {"rank": int(m.group(1)), "layers": [int(m.group(2)), int(m.group(3))],
            "resident_mib": float(m.group(4)), "line": line}


def _tps(stderr: str) -> float:
    return float(re.search(r"generated \d+ tokens ([\d.]+) tok/s", stderr).group(1))


# (backend, --model, tokens, --max-resident of each rank in the 2-rank run): the default model fully held and under
# per-rank budgets (each below its whole share), Gemma 3 270M (its tied embedding, 69% of it, is the last rank's)
RUNS = [("torch", None, 32, None), ("torch", None, 32, "36MiB,40MiB"), ("mlx", None, 16, None),
        ("torch", "gemma3-270m", 16, None), ("mlx", "gemma3-270m", 8, None)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs/results/pipeline.json")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--hop-out", default=None, help=argparse.SUPPRESS)  # the ranks' own run
    args = p.parse_args()
    if args.hop_out:
        return hop(args.hop_out)
    spec = load_spec(resolve_model(None))
    n = spec.architecture.num_hidden_layers
    layer_bytes = [sum(e.nbytes(2) for e in store.entries(spec) if e.name.startswith(f"model.layers.{i}."))
                   for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        hop_file = Path(tmp) / "hop.json"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        __file__, "--hop-out", str(hop_file)], check=True, capture_output=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        hops = json.loads(hop_file.read_text())
    records = [{"kind": "hop", "backend": "torch", "transport": "gloo loopback", **h} for h in hops]
    records.append({"kind": "model", "model": resolve_model(None).name, "layers": n,
                    "layer_bytes_median": int(np.median(layer_bytes)), "hidden_size": spec.architecture.hidden_size,
                    "vocab_size": spec.architecture.vocab_size})
    for backend, model, tokens, budget in RUNS:
        if importlib.util.find_spec(backend) is None:  # torch and mlx: their modules share the names
            continue
        gen = ["-p", "Tell me about the sea.", "--max-tokens", str(min(tokens, args.tokens)), "--backend", backend,
               "--threads", "1", *(["--model", model] if model else [])]
        runs = {}
        for label, extra in (("one process", []), ("1 rank", ["--pipeline", "1"]), ("2 ranks", ["--pipeline", "2"])):
            if budget:  # one process under the whole model's share of the ranks' budgets is not the same plan:
                extra = [*extra, "--max-resident", budget] if label == "2 ranks" else extra  # against fully held
            r = subprocess.run([sys.executable, "-m", "dn", "generate", *gen, *extra], capture_output=True, text=True,
                               check=True)
            runs[label] = {"tok_s": _tps(r.stderr), "text": r.stdout.strip(),
                           "ranks": [_rank(line) for line in r.stderr.splitlines() if line.startswith("rank ")]}
        for label, r in runs.items():
            records.append({"kind": "generate", "series": f"{backend} {model or 'default'} {budget or 'held'}",
                            "backend": backend, "model": model or "default",
                            "max_resident": budget if label == "2 ranks" else None, "threads_per_rank": 1,
                            "run": label, "tokens": min(tokens, args.tokens), "tok_s": r["tok_s"], "ranks": r["ranks"],
                            "rank_over_one_process": [x["resident_mib"] / runs["1 rank"]["ranks"][0]["resident_mib"]
                                                      for x in r["ranks"]],
                            "same_text_as_one_process": r["text"] == runs["one process"]["text"]})
    timing.write(timing.report(records, note="one machine, 2 cores shared with other work: the hop is loopback "
                                             "through the kernel, the tok/s ratio a same-run comparison"), args.out)
    print(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
