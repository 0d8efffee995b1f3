"""Footprint: bytes by role accounted from the spec, beside what the platform measures a load holds. `dn footprint`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dn import cli
from dn.core.errors import DnError
from dn.core.files import atomic_file
from dn.model import store
from dn.model.sources import resolve_model
from dn.model.spec import DTYPE_BYTES, ROLES, ModelSpec, load_spec
from dn.runtime import backend as backends
from dn.runtime import loader, residency
from dn.runtime.budget import parse_budget


def kv_cache_bytes(spec: ModelSpec, ctx: int, dtype: str, batch: int = 1) -> int:
    a = spec.architecture
    return 2 * a.num_hidden_layers * a.num_key_value_heads * a.head_dim * ctx * batch * DTYPE_BYTES[dtype]


def accounted(spec: ModelSpec, dtype: str, ctx: int) -> dict:
    """Dense weights by role at the compute dtype, what dn keeps resident (dn.model.store.resident_bytes: every
    format, by part) and the KV cache at ctx."""
    b = DTYPE_BYTES[dtype]
    roles = dict.fromkeys(ROLES, 0)
    for e in store.entries(spec):
        roles[e.role] += e.numel * b
    resident = store.resident_bytes(spec, dtype)
    return {"dtype": dtype, "roles": roles, "tied_embeddings": spec.architecture.tie_word_embeddings,
            "dense_weight_bytes": sum(roles.values()), "resident_weight_bytes": resident["total"],
            "resident_by_format": resident, "kv_cache_bytes": kv_cache_bytes(spec, ctx, dtype), "ctx": ctx}


def setup_arg_parser():
    p = cli.ArgumentParser(prog="dn footprint", description="Bytes by role, accounted and measured.")
    cli.add_model_args(p)
    p.add_argument("--ctx", type=cli.positive_int, default=2048, help="context length for the KV cache")
    p.add_argument("--no-measure", action="store_true", help="account only; do not load the model")
    p.add_argument("--json", default=None, help="write the report here")
    residency.add_args(p)
    return p


def _mib(n: int) -> str:
    return f"{n / 2**20:10.2f} MiB"


def report_lines(report: dict) -> list[str]:
    acc = report["accounted"]
    lines = [f"model {report['model']}  ({acc['dtype']}, ctx {acc['ctx']})", "accounted from the spec:"]
    for role in ROLES:
        note = " (tied to embeddings)" if role == "lm_head" and acc["tied_embeddings"] else ""
        lines.append(f"  {role:<12}{_mib(acc['roles'][role])}{note}")
    lines += [f"  {'weights':<12}{_mib(acc['dense_weight_bytes'])}  dense",
              f"  {'resident':<12}{_mib(acc['resident_weight_bytes'])}  as dn keeps them",
              f"  {'kv cache':<12}{_mib(acc['kv_cache_bytes'])}  at ctx {acc['ctx']}"]
    m = report.get("measured")
    if m:
        lines += measured_lines(m)
    return lines


def _detail(m: dict) -> str:
    parts = {k: m[f"{k}_bytes"] for k in ("anon", "file", "pss")}
    return ", ".join(f"{k} {v / 2**20:.2f}" for k, v in parts.items() if v is not None)


def measured_lines(m: dict) -> list[str]:
    """What the load added, measured by the platform (dn.runtime.memory); the process's view too where a device
    allocator gave the figures."""
    process = [f"  {'process':<12}{_mib(m['rss_bytes'])}  {m['rss_kind']} ({_detail(m)} MiB)",
               f"  {'its peak':<12}{_mib(m['rss_peak_bytes'])}  {m['rss_peak_kind']}"]
    own = m["measured_kind"] == m["rss_kind"]  # no device allocator: the process figures are the measure
    return [f"measured on {m['backend']} ({m['device']}), what the load added:",
            f"  {'resident':<12}{_mib(m['measured_resident_bytes'])}  {m['measured_kind']}"
            + (f" ({_detail(m)} MiB)" if own else ""),
            f"  {'load peak':<12}{_mib(m['load_peak_bytes'])}  {m['load_peak_kind']}", *([] if own else process)]


def _main(argv) -> int:
    args = setup_arg_parser().parse_args(argv)
    model_dir = resolve_model(args.model, dense=args.dense)
    spec = load_spec(model_dir)
    if args.dtype == "auto":
        args.dtype = loader.compute_dtype(backends.resolve(args.backend), spec)
    report = {"model": str(args.model or model_dir), "accounted": accounted(spec, args.dtype, args.ctx)}
    plan = None
    if args.max_resident is not None and args.no_measure:  # planned from the accounting alone, in the format
        budget = parse_budget(args.max_resident, residency.dense_bf16(spec))  # the loader would pick
        _, held = loader.store_for(model_dir, spec, args.dtype, budget, args.residency_mode)
        plan = residency.make_plan(held, args.dtype, budget, args.residency_mode,
                                   residency.block_bytes(held, args.dtype),
                                   buffer_block_bytes=residency.block_bytes(held, args.dtype, largest=True))
    if not args.no_measure:
        run = loader.load(args.model, args.backend, args.dtype, dense=args.dense, **residency.load_args(args))
        report["measured"] = measured(run)
        plan = run.residency.plan if run.residency else None
    if plan is not None:
        report["plan"] = plan.summary()
    print("\n".join(report_lines(report) + (plan.lines() if plan else [])))
    if args.json:
        write_json(report, args.json)
    return 0


def measured(run) -> dict:
    return {"backend": run.backend.NAME, "device": run.backend.device_name(), **run.memory}


def write_json(report: dict, path: str) -> None:
    out = Path(path)
    try:
        with atomic_file(out) as tmp:
            tmp.write_text(json.dumps(report, indent=1) + "\n")
    except OSError as e:
        raise DnError(f"cannot write {out}: {e.strerror}") from None


def main(argv=None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
