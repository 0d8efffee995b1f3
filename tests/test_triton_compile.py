"""The Triton kernels compiled ahead of time for an H100/H200 (sm_90) with Triton's own bundled compiler: no GPU
needed. The interpreter runs the kernels' arithmetic but not the compiler, which rejects what it accepts (a
non-constexpr global, a type mismatch between branches); this catches those before a lent GPU's minutes are spent.
Each variant the host code launches (default tiles per batch, both dtypes, paired and unpaired loads, split-K,
float32 decode, both sparse activations) is compiled to a cubin, with the integer arguments specialised as
Triton does at launch (divisible by 16)."""

import importlib.util

import pytest

pytest.importorskip("torch")
if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton not installed", allow_module_level=True)

import triton

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:  # pragma: no cover - another Triton layout
    pytest.skip("this Triton has no ahead-of-time API", allow_module_level=True)

from triton.backends import backends

if "nvidia" not in backends:
    pytest.skip("this Triton has no NVIDIA backend", allow_module_level=True)
SM90 = GPUTarget("cuda", 90, 32)


def compile_kernel(fn, sig: dict, constexprs: dict, num_warps: int = 4):
    """sig: argument -> Triton type; pointers and integers marked divisible by 16 (as a launch with aligned
    tensors and sizes like 4096 specialises them)."""
    names = list(sig) + list(constexprs)
    full = sig | {k: "constexpr" for k in constexprs}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items() if t.startswith("*") or t == "i32"}
    return triton.compile(ASTSource(fn=fn, signature=full, constexprs=constexprs, attrs=attrs), target=SM90,
                          options={"num_warps": num_warps})


def matvec_variants():
    from dn_torch import _triton_codec as tk

    for dtype, paired, batch, split in [("bf16", True, 1, 1), ("bf16", True, 4, 1), ("bf16", True, 16, 1),
                                        ("fp16", True, 1, 1), ("bf16", False, 3, 1), ("bf16", True, 2, 4)]:
        yield dtype, paired, batch, tk.fixed4_config(batch) | {"SPLIT_K": split}
    for dtype, batch in (("bf16", 4), ("fp16", 16)):  # tensor-core tiles (tf32 wgmma on sm_90)
        yield dtype, True, batch, {"BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 1, "DOT": True}


@pytest.mark.parametrize("dtype,paired,batch,cfg", list(matvec_variants()))
def test_fixed4_matvec_compiles_for_sm90(dtype, paired, batch, cfg):
    from dn_torch import _triton_codec as tk

    sig = {"table": "*u8", "nib": "*u8", "raw": "*u8", "raw16": "*i16" if paired else "*u8", "x": f"*{dtype}",
           "y": "*fp32" if cfg["SPLIT_K"] > 1 else f"*{dtype}", "esc_index": "*i32", "esc_symbol": "*u8",
           "row_ptr": "*i32", "B": "i32", "IN": "i32", "OUT": "i32", "stride_x": "i32", "stride_y": "i32"}
    bp = max(16 if cfg["DOT"] else 1, triton.next_power_of_2(batch))
    cx = {"BF16": dtype == "bf16", "PAIRED": paired, "BP": bp, **cfg, "ESC_BLOCK": 16}
    assert compile_kernel(tk._f4_matvec_kernel, sig, cx).asm["cubin"]


@pytest.mark.parametrize("bf16,paired,f32", [(True, True, False), (False, True, True), (True, False, False)])
def test_fixed4_decode_compiles_for_sm90(bf16, paired, f32):
    from dn_torch import _triton_codec as tk

    out = "*fp32" if f32 else "*i16"
    sig = {"table": "*u8", "nib": "*u8", "raw": "*u8", "raw16": "*i16" if paired else "*u8", "out": out,
           "out32": ("*fp32" if f32 else "*i32") if paired else out, "N": "i32"}
    assert compile_kernel(tk._f4_decode_kernel, sig, {"BF16": bf16, "PAIRED": paired, "F32": f32, "BLOCK": 1024})
    sig = {"raw": "*u8", "out": out, "esc_index": "*i32", "esc_symbol": "*u8", "E": "i32"}
    assert compile_kernel(tk._f4_escape_decode_kernel, sig, {"BF16": bf16, "F32": f32, "BLOCK": 256})


@pytest.mark.parametrize("gelu", [False, True])
def test_sparse_kernel_compiles_for_sm90(gelu):
    from dn_torch import kernels as ts

    sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "idx_ptr": "*i64", "c_ptr": "*bf16", "y_ptr": "*fp32", "K": "i32"}
    cx = {"D": 4096, "BLOCK_K": 16, "BLOCK_D": 256, "GELU": gelu}
    assert compile_kernel(ts._fused_kernel, sig, cx).asm["cubin"]
    sig["h_ptr"] = sig.pop("y_ptr")  # the split design: activations, then the down rows
    sig["K"] = sig.pop("K")
    assert compile_kernel(ts._act_kernel, sig, cx).asm["cubin"]
    sig = {"w_ptr": "*bf16", "idx_ptr": "*i64", "h_ptr": "*fp32", "y_ptr": "*fp32", "K": "i32"}
    assert compile_kernel(ts._down_kernel, sig, {"D": 4096, "BLOCK_K": 16, "BLOCK_D": 128, "SPLIT": 8})
