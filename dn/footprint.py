"""Footprint: bytes by role accounted from the spec, beside what the backend measures. `dn footprint`."""

from __future__ import annotations

import json
import sys

from dn import cli, codec, sparse
from dn.spec import DTYPE_BYTES, ROLES, ModelSpec, weight_bytes_by_role


def kv_cache_bytes(spec: ModelSpec, ctx: int, dtype: str, batch: int = 1) -> int:
    a = spec.architecture
    return 2 * a.num_hidden_layers * a.num_key_value_heads * a.head_dim * ctx * batch * DTYPE_BYTES[dtype]


def accounted(spec: ModelSpec, dtype: str, ctx: int) -> dict:
    """Dense weights by role at the compute dtype, and the KV cache at ctx. With the lossless codec,
    resident = coded bytes + the other tensors at the compute dtype + decode tables + one layer of
    decode scratch (16-bit bits and weights at the compute dtype)."""
    roles = weight_bytes_by_role(spec, dtype)
    dense = sum(roles.values())
    resident = dense
    if spec.codec:
        coded = set(spec.codec["coded_tensors"])
        layer = max(sum(t.numel for t in spec.layer_tensors(i) if t.name in coded)
                    for i in range(spec.architecture.num_hidden_layers))
        plain = sum(t.numel for t in spec.tensors if t.name not in coded) * DTYPE_BYTES[dtype]
        luts = len(coded) * 2 << codec.MAXLEN  # decode tables built at load
        resident = spec.codec["coded_bytes"] + plain + luts + layer * (2 + DTYPE_BYTES[dtype])  # bits + weights
    if spec.sparse:  # routers, thresholds and priors ride beside all the weights (no offload yet)
        resident += sparse.side_bytes(spec.sparse, DTYPE_BYTES[dtype])
    return {"dtype": dtype, "roles": roles, "tied_embeddings": spec.architecture.tie_word_embeddings,
            "dense_weight_bytes": dense, "resident_weight_bytes": resident,
            "kv_cache_bytes": kv_cache_bytes(spec, ctx, dtype), "ctx": ctx}


def setup_arg_parser():
    p = cli.ArgumentParser(prog="dn footprint", description="Bytes by role, accounted and measured.")
    cli.add_model_args(p)
    p.add_argument("--ctx", type=cli.positive_int, default=2048, help="context length for the KV cache")
    p.add_argument("--no-measure", action="store_true", help="account only; do not load the model")
    p.add_argument("--json", default=None, help="write the report here")
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
        lines += [f"measured on {m['backend']} ({m['device']}):",
                  f"  {'weights':<12}{_mib(m['resident_weight_bytes'])}  resident",
                  f"  {'peak':<12}{_mib(m['peak_memory_bytes'])}  {m['peak_kind']}"]
    return lines


def _main(argv) -> int:
    from dn.sources import resolve_model
    from dn.spec import load_spec

    args = setup_arg_parser().parse_args(argv)
    model_dir = resolve_model(args.model)
    spec = load_spec(model_dir)
    report = {"model": str(args.model or model_dir), "accounted": accounted(spec, args.dtype, args.ctx)}
    if not args.no_measure:
        from dn import loader

        run = loader.load(str(model_dir), args.backend, args.dtype)
        report["measured"] = measured(run)
    print("\n".join(report_lines(report)))
    if args.json:
        write_json(report, args.json)
    return 0


def measured(run) -> dict:
    be = run.backend
    kind = "mlx peak" if be.NAME == "mlx" else ("cuda max allocated" if "cuda" in be.device_name()
                                                 else "process peak RSS")
    return {"backend": be.NAME, "device": be.device_name(),
            "resident_weight_bytes": be.resident_weight_bytes(run.model),
            "peak_memory_bytes": be.peak_memory_bytes(), "peak_kind": kind}


def write_json(report: dict, path: str) -> None:
    from pathlib import Path

    from dn.errors import DnError

    out = Path(path)
    tmp = out.with_name(out.name + ".tmp")
    try:
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(out)
    except OSError as e:
        raise DnError(f"cannot write {out}: {e.strerror}") from None


def main(argv=None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
