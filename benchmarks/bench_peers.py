"""The lossless codec beside its peers on the same bf16 tensors: dn's codec (dn/formats/lossless.py), binade (MLX,
bit-exact
bf16; packs Linear weights with both sides >= 256 and the embedding) and lmzip (lmz: storage only, a whole file).

    python benchmarks/bench_peers.py [--model M] --json OUT [--markdown OUT.md] [--work DIR]

Bits per weight are compressed bits over the weights they cover, on one tensor set at a time:
- binade's set: dn's codec per tensor (`dn codec stats`, tables included) against binade's pack (its own bit count,
  and the bytes of its files); both decoded back here and compared bit for bit (binade's numpy decoder);
- the whole file (every tensor, safetensors header included for lmzip): dn's codec on every tensor, the folder
  `dn convert --codec lossless` writes (it keeps the embedding dense), lmzip's archive (round trip checked);
- in memory: dn's resident bytes of the coded weights (dn.model.store: coded bytes, decode tables, one layer of decode
  scratch) at bf16; binade's loader runs on Metal or CUDA only (its error line is recorded where it cannot run).
A peer that does not install or run here is recorded with its error line; no figure is taken from elsewhere.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from dn.bench import configs, runner
from dn.core import tensors
from dn.core.errors import DnError
from dn.core.files import cache_dir
from dn.formats import lossless
from dn.model import store
from dn.model.sources import resolve_model
from dn.model.spec import load_spec, weight_files
from dn.runtime import timing

BINADE_MEMORY = """
import json, sys
import mlx.core as mx
from binade.mlx import r4
base = mx.get_active_memory()
model, _ = r4.load(sys.argv[1])
mx.eval(model.parameters())
print(json.dumps({"active_bytes": mx.get_active_memory() - base, "peak_bytes": mx.get_peak_memory() - base}))
"""


def version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def error_line(e: BaseException | str) -> str:
    text = e if isinstance(e, str) else f"{type(e).__name__}: {e}"
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"


def bf16_folder(model_dir: Path, work: Path) -> Path:
    """The model's weights as bf16 safetensors: the folder itself when they are, else a copy rounded to bf16."""
    files = weight_files(model_dir)
    if all(dt not in ("F32", "F16") for f in files for _, dt in tensors.load(f).values()):
        return model_dir
    out = work / "bf16"
    if not out.is_dir():
        out.mkdir(parents=True)
        for f in files:
            t = {k: (tensors.f32_to_bf16(np.asarray(a, np.float32)), "BF16") if dt in ("F32", "F16") else (a, dt)
                 for k, (a, dt) in tensors.load(f).items()}
            tensors.save(t, out / f.name)
        for f in model_dir.iterdir():
            if f.is_file() and not f.name.endswith(".safetensors"):
                (out / f.name).write_bytes(f.read_bytes())
    return out


def source_bits(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= {k: np.asarray(a) for k, (a, dt) in tensors.load(f).items()}
    return out


def bpw(bits: float, weights: int) -> float:
    return bits / weights if weights else float("nan")


def dn_rows(folder: Path, stats: dict, binade_set: list[str] | None, coded_dir: Path | None) -> list[dict]:
    t = stats["tensors"]
    rows = []
    if binade_set:
        w = sum(t[n]["weights"] for n in binade_set)
        rows.append({"codec": "dn lossless", "version": version("dreamnova"), "tensors": "binade's set",
                     "tensor_count": len(binade_set), "weights": w,
                     "bits_per_weight_disk": bpw(8 * sum(t[n]["bytes"] for n in binade_set), w),
                     "bit_exact": True, "note": "dn codec stats per tensor (tables included); decode is bit-exact "
                                                "by construction and tested (tests/test_codec*.py)"})
    total = stats["total"]
    rows.append({"codec": "dn lossless", "version": version("dreamnova"), "tensors": "every tensor",
                 "tensor_count": len(t), "weights": total["weights"],
                 "bits_per_weight_disk": total["bits_per_weight"], "bit_exact": True,
                 "note": "dn codec stats: every floating tensor coded on its own"})
    if coded_dir is not None:
        spec = load_spec(coded_dir)
        coded = set(spec.codec["coded_tensors"])
        coded_w = sum(ti.numel for ti in spec.tensors if ti.name in coded)
        files = sum(f.stat().st_size for f in coded_dir.glob("*.safetensors"))
        resident = store.resident_bytes(spec, "bfloat16")["lossless"]
        rows.append({"codec": "dn lossless (dn convert --codec lossless)", "version": version("dreamnova"),
                     "tensors": "every tensor", "tensor_count": len(spec.tensors), "weights": total["weights"],
                     "bits_per_weight_disk": bpw(8 * files, total["weights"]), "bit_exact": True,
                     "note": f"the folder's safetensors files; {len(coded)} decoder projections coded, the embedding "
                             "and norms kept dense"})
        rows.append({"codec": "dn lossless (dn convert --codec lossless)", "version": version("dreamnova"),
                     "tensors": "coded projections", "tensor_count": len(coded), "weights": coded_w,
                     "bits_per_weight_disk": bpw(8 * spec.codec["coded_bytes"], coded_w),
                     "bits_per_weight_memory": bpw(8 * resident, coded_w), "bit_exact": True,
                     "note": "in memory at bf16 (dn.model.store.resident_bytes): coded bytes, decode tables "
                             "and one layer of decode scratch"})
    return rows


def run_binade(folder: Path, work: Path, src: dict[str, np.ndarray]) -> tuple[list[dict], list[str] | None]:
    row = {"codec": "binade", "version": version("binade"), "tensors": "binade's set"}
    try:  # a peer: optional, recorded as an error when it does not import
        from binade.pack import pack_model
        from binade.unpack import PackedModel
    except Exception as e:  # not installed, or its imports fail here
        return [row | {"error": error_line(e)}], None
    out = work / "binade"
    try:
        if not (out / "binade_pack.json").is_file():
            pack_model(folder, out, log=lambda s: None)
        report = json.loads((out / "binade_pack.json").read_text())
        packed = sorted(report["tensors"])
        pm = PackedModel(out, gpu=False)  # its numpy decoder: runs anywhere
        exact = all(np.array_equal(pm.tensor(n).view(np.uint16), src[n].view(np.uint16)) for n in packed)
    except Exception as e:
        return [row | {"error": error_line(e)}], None
    if not packed:
        return [row | {"error": "binade packs no tensor of this model (Linear/embedding by Llama-style names, "
                                "both sides >= 256)"}], None
    w = report["packed_numel"]
    files = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    other = sum(src[n].nbytes for n in src if n not in report["tensors"])
    row |= {"tensor_count": len(packed), "weights": w, "bits_per_weight_disk": bpw(report["packed_bits"], w),
            "bits_per_weight_files": bpw(8 * (files - other), w), "bit_exact": exact,
            "note": "binade pack (format 2, Rice); bits from its report; files: its safetensors bytes less the "
                    "tensors it copies unpacked"}
    proc = subprocess.run([sys.executable, "-c", BINADE_MEMORY, str(out)], capture_output=True, text=True)
    if proc.returncode == 0:
        mem = json.loads(proc.stdout.strip().splitlines()[-1])
        row |= {"bits_per_weight_memory": bpw(8 * (mem["active_bytes"] - other), w), "memory": mem}
    else:
        row["memory_error"] = error_line(proc.stderr)
    return [row], packed


def run_lmzip(folder: Path, work: Path, weights: int) -> list[dict]:
    row = {"codec": "lmzip", "version": version("lmzip"), "tensors": "whole file", "weights": weights}
    try:  # a peer: optional, recorded as an error when it does not import
        import lmz
    except Exception as e:
        return [row | {"error": error_line(e)}]
    try:
        files = sorted(folder.glob("*.safetensors"))
        archive_bytes, exact = 0, True
        for f in files:
            arc, back = work / (f.name + ".lmz"), work / (f.name + ".back")
            lmz.compress(str(f), str(arc))
            lmz.decompress(str(arc), str(back))
            exact &= hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(f.read_bytes()).digest()
            archive_bytes += arc.stat().st_size
            back.unlink()
    except Exception as e:
        return [row | {"error": error_line(e)}]
    return [row | {"tensor_count": None, "bits_per_weight_disk": bpw(8 * archive_bytes, weights),
                   "bit_exact": exact, "backends": lmz.backends(),
                   "note": "lmz.compress defaults on each safetensors file (header and every tensor); storage only: "
                           "it decompresses to the file"}]


def table(rows: list[dict]) -> str:
    lines = ["| codec | version | tensors | weights | bits/weight on disk | bits/weight in memory | bit-exact | note |",
             "|---|---|---|---:|---:|---:|---|---|"]

    def f(x):
        return "–" if x is None else f"{x:.3f}"

    for r in rows:
        if "error" in r:
            lines.append(f"| {r['codec']} | {r['version'] or 'not installed'} | {r['tensors']} | – | – | – | – "
                         f"| did not run here: `{r['error']}` |")
            continue
        mem = f(r.get("bits_per_weight_memory")) if "memory_error" not in r else "not run here"
        note = r.get("note", "") + (f"; in memory: `{r['memory_error']}`" if "memory_error" in r else "")
        lines.append(f"| {r['codec']} | {r['version']} | {r['tensors']} ({r.get('tensor_count') or 'file'}) "
                     f"| {r['weights']:,} | {f(r['bits_per_weight_disk'])} | {mem} | {r['bit_exact']} | {note} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the embedded default model)")
    p.add_argument("--work", default=None, help="folder for the peers' outputs (default: a temporary one)")
    p.add_argument("--json", required=True)
    p.add_argument("--markdown", default=None)
    args = p.parse_args(argv)

    try:
        model_dir = resolve_model(args.model)
        with tempfile.TemporaryDirectory(prefix="dn-peers-") as tmp:
            work = Path(args.work) if args.work else Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            folder = bf16_folder(model_dir, work)
            src = source_bits(folder)
            print("dn codec stats ...", file=sys.stderr)
            stats = lossless.stats(folder)
            print("binade ...", file=sys.stderr)
            binade_rows, packed = run_binade(folder, work, src)
            config = configs.parse_config("lossless")
            coded_dir = runner.folder_for(config, folder, cache_dir() / "bench", None, "auto")
            print("dn convert --codec lossless (cached) ...", file=sys.stderr)
            convert_error = None
            try:
                runner.convert(config, folder, coded_dir, None, "auto", dict(os.environ))
            except DnError as e:  # a model dn does not run (e.g. BERT): the codec's own stats still count
                coded_dir, convert_error = None, str(e)
            rows = dn_rows(folder, stats, packed, coded_dir)
            rows = rows[:1 if packed else 0] + binade_rows + rows[1 if packed else 0:]
            if convert_error:
                rows.append({"codec": "dn lossless (dn convert --codec lossless)", "version": version("dreamnova"),
                             "tensors": "every tensor", "error": convert_error})
            print("lmzip ...", file=sys.stderr)
            rows += run_lmzip(folder, work, stats["total"]["weights"])
    except DnError as e:
        print(f"dn: error: {e}", file=sys.stderr)
        return 2
    result = timing.report(rows, ["python"] + sys.argv, model=str(args.model or model_dir.name),
                              source=str(folder))
    timing.write(result, args.json)
    md = table(rows)
    if args.markdown:
        Path(args.markdown).write_text(md)
    print(md, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
