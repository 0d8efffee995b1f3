"""Affine-quantized matmul on torch (dn_torch/quant.py): one projection y = x W^T at batch 1 and 4, the kernel
path (16-bit compute, weights in the kernel layout) and the plain path (blocks of rows dequantized then
matmul, float32 and bfloat16) against dense float32 and bfloat16 F.linear measured in the same run; a sweep
of token counts where kernel and plain cross (dn_torch.quant._KERNEL_TOKENS); and with --load, the peak
resident memory of loading a synthetic quantized Llama folder against its resident weights.

    PYTHONPATH=. python benchmarks/bench_quant.py [--shapes 576x1536,4096x14336] [--threads N] [--load] [--json OUT]

A shape is [out, in]; weights N(0, 0.02) quantized by dn.formats.quant with bf16 scales and biases (as mlx-lm stores).
Times: median of --reps calls after a warm-up call (dn.runtime.timing.timer); JSON: dn.runtime.timing.report, a
record per (shape, format, batch), the crossover sweep and --load's figures beside them.
"""

import argparse
import json
import os
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dn.core import tensors
from dn.formats import quant as ref
from dn.model.spec import load_spec
from dn.runtime import backend as backends
from dn.runtime import memory, timing
from dn_torch import quant as tq

FORMATS = ((4, 32), (4, 64), (8, 64))


def timer(fn, reps: int) -> float:
    """Median seconds per call after one warm-up (dn.runtime.timing.timer, the timer every benchmark shares)."""
    return timing.timer(fn, reps=reps, warmup=1)["median_s"]


def quantized(w: np.ndarray, bits: int, gs: int, dtype) -> tq.QuantizedLinear:
    """A QuantizedLinear holding w, in the kernel layout for dtype where one applies."""
    packed, scales, biases = ref.quantize(w, bits, gs)
    mod = tq.QuantizedLinear(w.shape[1], w.shape[0], False, bits, gs)
    mod.weight = torch.from_numpy(packed)
    mod.scales, mod.biases = (torch.from_numpy(a).bfloat16() for a in (scales, biases))
    mod.prepare(dtype)
    return mod


def bench_shape(m: int, k: int, reps: int) -> list[dict]:
    w = (0.02 * np.random.default_rng(0).standard_normal((m, k))).astype(np.float32)
    dense = {torch.float32: torch.from_numpy(w), torch.bfloat16: torch.from_numpy(w).bfloat16()}
    rows = []
    for bits, gs in FORMATS:
        fast, plain = quantized(w, bits, gs, torch.bfloat16), quantized(w, bits, gs, torch.float32)
        for b in (1, 4):
            x = {dt: torch.randn(b, k).to(dt) for dt in dense}
            t = {"dense_f32_s": timer(partial(F.linear, x[torch.float32], dense[torch.float32]), reps),
                 "dense_bf16_s": timer(partial(F.linear, x[torch.bfloat16], dense[torch.bfloat16]), reps),
                 "fast_s": timer(partial(fast, x[torch.bfloat16]), reps),
                 "plain_f32_s": timer(partial(plain, x[torch.float32]), reps),
                 "plain_bf16_s": timer(partial(plain, x[torch.bfloat16]), reps)}
            row = {"shape": [m, k], "bits": bits, "group_size": gs, "batch": b,
                   "fast_layout": tq._kind(fast.weight), "fast_uses_kernel": b <= _kernel_tokens(fast), **t,
                   "fast_vs_dense_bf16": t["fast_s"] / t["dense_bf16_s"],
                   "fast_vs_dense_f32": t["fast_s"] / t["dense_f32_s"],
                   "plain_f32_vs_dense_f32": t["plain_f32_s"] / t["dense_f32_s"],
                   "plain_bf16_vs_dense_bf16": t["plain_bf16_s"] / t["dense_bf16_s"],
                   "resident_bytes": _bytes(fast), "mlx_layout_bytes": _bytes(plain)}
            rows.append(row)
            print(json.dumps({k_: (round(v, 6) if isinstance(v, float) else v) for k_, v in row.items()}),
                  flush=True)
    return rows


def _kernel_tokens(mod) -> int:
    return tq._KERNEL_TOKENS.get(tq._kind(mod.weight), 0)


def _bytes(mod) -> int:
    return sum(t.numel() * t.element_size() for t in mod.buffers())


def crossover(m: int, k: int, reps: int) -> list[dict]:
    """Kernel vs plain path on the same kernel-layout weights, by token count (bfloat16)."""
    w = (0.02 * np.random.default_rng(0).standard_normal((m, k))).astype(np.float32)
    out = []
    for bits, gs in ((4, 64), (8, 64)):
        mod = quantized(w, bits, gs, torch.bfloat16)
        kernel = tq._KERNELS[tq._kind(mod.weight)]
        for t in (1, 2, 4, 8, 16, 32, 64):
            x = torch.randn(t, k).bfloat16()
            kern = timer(partial(kernel, x, mod.weight, mod.scales, mod.biases, gs), reps)
            plain = timer(partial(tq._plain, x, mod.weight, mod.scales, mod.biases, bits, gs), reps)
            out.append({"shape": [m, k], "bits": bits, "group_size": gs, "tokens": t, "kernel_s": kern,
                        "plain_s": plain})
            print(json.dumps(out[-1]), flush=True)
    return out


def load_memory(model_dir: Path) -> dict:
    """Peak RSS of backend.load on a quantized folder (VmHWM after clear_refs), vs its resident weights."""
    be = backends.get("torch")
    spec = load_spec(model_dir)
    out = {}
    for dtype in ("bfloat16", "float32"):
        model, fig = memory.measure_load(be, model_dir, spec, dtype)
        weights = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                       for t in list(model.parameters()) + list(model.buffers())}.values())
        layer = sum(t.numel() * t.element_size() for t in model.model.layers[0].state_dict().values())
        out[dtype] = {"resident_weight_bytes": weights, "one_layer_bytes": layer,
                      "load_peak_bytes": fig["load_peak_bytes"], "load_peak_kind": fig["load_peak_kind"],
                      "peak_minus_weights_bytes": fig["load_peak_bytes"] - weights,
                      "measured_resident_bytes": fig["measured_resident_bytes"]}
        print(json.dumps({model_dir.name: {dtype: out[dtype]}}), flush=True)
        del model
    return out


def load_memories(root: Path) -> dict:
    """The first load of a process also pays torch's one-time CPU runtime set-up (thread pool, about 10 MB):
    a small folder first, then the figures that matter on bigger ones, 4 and 8 bits."""
    folders = [("q4-small-first-load", {}), ("q4", {"hidden": 2048, "inter": 5632, "vocab": 32000}),
               ("q8", {"hidden": 2048, "inter": 5632, "vocab": 32000, "bits": 8})]
    return {name: load_memory(synthetic_folder(root / name, **kw)) for name, kw in folders}


def synthetic_folder(path: Path, hidden=1024, inter=2816, layers=4, vocab=16384, bits=4, gs=64) -> Path:
    """A random Llama quantized by dn.formats.quant and saved in mlx-lm's layout (bf16 scales, biases, norms)."""
    rng = np.random.default_rng(0)
    bf16 = tensors.f32_to_bf16
    shapes = {"model.embed_tokens": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + f"self_attn.{n}_proj": (hidden, hidden) for n in "qkvo"}
        shapes |= {p + "mlp.gate_proj": (inter, hidden), p + "mlp.up_proj": (inter, hidden),
                   p + "mlp.down_proj": (hidden, inter)}
    arrays = {"model.norm.weight": (bf16(np.ones(hidden, np.float32)), "BF16")}
    for i in range(layers):
        for n in ("input_layernorm", "post_attention_layernorm"):
            arrays[f"model.layers.{i}.{n}.weight"] = (bf16(np.ones(hidden, np.float32)), "BF16")
    for name, shape in shapes.items():
        packed, s, b = ref.quantize((0.02 * rng.standard_normal(shape)).astype(np.float32), bits, gs)
        arrays |= {name + ".weight": packed, name + ".scales": (bf16(s), "BF16"), name + ".biases": (bf16(b), "BF16")}
    path.mkdir(parents=True, exist_ok=True)
    tensors.save(arrays, path / "model.safetensors")
    cfg = {"model_type": "llama", "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
           "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 64, "head_dim": 64,
           "vocab_size": vocab, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "tie_word_embeddings": True,
           "quantization": ref.params(bits, gs)}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="576x1536,4096x14336")
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--load", action="store_true", help="also measure the peak memory of a quantized load")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 is steadier on a busy machine")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    extra = {"threads": torch.get_num_threads(), "loadavg_start": os.getloadavg(),
             "timing": "median of reps after one warm-up, perf_counter"}
    if args.load:  # first: before the big matrices of the speed runs are allocated
        with tempfile.TemporaryDirectory() as d:
            extra["load_memory"] = load_memories(Path(d))
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows = [r for m, k in shapes for r in bench_shape(m, k, args.reps)]
    m, k = shapes[-1]
    extra |= {"crossover": crossover(m, k, max(3, args.reps // 4)), "loadavg_end": os.getloadavg()}
    if args.json:
        timing.write(timing.report(rows, [sys.executable, *sys.argv], **extra), args.json)


if __name__ == "__main__":
    main()
