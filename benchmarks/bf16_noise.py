"""How far each backend's bfloat16 logits are from its own float32 logits, and from each other, on the
parity prompts: the noise floor behind the bfloat16 parity threshold.

    python benchmarks/bf16_noise.py [--json OUT]

JSON: dn.runtime.timing.report, one record per pair compared.
"""

import argparse
import gc
import sys

import numpy as np

from dn.runtime import loader, timing
from parity.run import PROMPTS, rel_err


def logits(backend: str, dtype: str) -> list[np.ndarray]:
    run = loader.load(None, backend, dtype)
    out = [run.backend.logits(run.model, np.array([run.tokenizer.encode(p)]))[0] for p in PROMPTS]
    del run
    gc.collect()
    return out


def summary(a, b) -> dict:
    e = np.concatenate([rel_err(x, y) for x, y in zip(a, b)])
    return {"max_rel_err": float(e.max()), "mean_rel_err": float(e.mean())}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json", default=None)
    args = p.parse_args()
    got = {(b, d): logits(b, d) for b in ("torch", "mlx") for d in ("float32", "bfloat16")}
    report = {f"{b} bfloat16 vs {b} float32": summary(got[b, "float32"], got[b, "bfloat16"]) for b in ("torch", "mlx")}
    report["mlx bfloat16 vs torch bfloat16"] = summary(got["mlx", "bfloat16"], got["torch", "bfloat16"])
    report["mlx float32 vs torch float32"] = summary(got["mlx", "float32"], got["torch", "float32"])
    for k, v in report.items():
        print(f"{k:<32} max {v['max_rel_err']:.2e}  mean {v['mean_rel_err']:.2e}")
    if args.json:
        records = [{"pair": k, **v} for k, v in report.items()]
        timing.write(timing.report(records, ["python", "benchmarks/bf16_noise.py", *sys.argv[1:]]), args.json)


if __name__ == "__main__":
    main()
