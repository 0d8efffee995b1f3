"""Lossless codec on torch. Stored format (dn.formats.lossless, Huffman): a pure-torch decoder (any device) and a
Triton kernel (CUDA/ROCm), both bit-exact against dn.formats.lossless. Runtime (dn.formats.fixed4): attach()
converts each coded projection at load and decodes it, just before its matmul, into a reused scratch buffer: the C
kernel on CPU, a pure-torch path elsewhere or when DN_NATIVE=0; all bit-exact."""

from __future__ import annotations

import functools
import importlib
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dn.formats import fixed4, lossless
from dn_torch.ops import DTYPES

_MASK32 = 0xFFFFFFFF


class PackedLayer(nn.Module):
    """A dn.formats.lossless.Pack held on a device: only the coded buffers are resident."""

    def __init__(self, p: lossless.Pack):
        super().__init__()
        self.lanes, self.steps, self.maxlen, self.dtype, self.n = p.lanes, p.steps, p.maxlen, p.dtype, p.n
        self.slices = p.slices
        # The pack's own arrays (fresh from dn.formats.lossless.pack), shared rather than copied: a loader holds
        # one copy of a layer's coded data beside the model, not two.
        for name, a in (("words", p.words.view("int32")), ("offsets", p.offsets.view("int32")),
                        ("luts", p.luts.view("int16")), ("raw", p.raw), ("table", p.table)):
            self.register_buffer(name, torch.from_numpy(np.require(a, requirements=["C", "W"])))

    def stream_meta(self):
        """Per stream: (bit position, LUT base, output base, count), as dn.formats.lossless.stream_meta."""
        t = self.table
        streams = torch.diff(torch.cat([t[:, 0], t.new_tensor([self.offsets.numel()])]))
        tid = torch.repeat_interleave(torch.arange(len(t), device=t.device), streams)
        local = torch.arange(self.offsets.numel(), device=t.device) - t[tid, 0]
        lane, tile_start = local % self.lanes, local // self.lanes * self.lanes * self.steps
        bitpos = (self.offsets.long() & _MASK32) + 32 * t[tid, 1]
        count = torch.clamp(-torch.div(-(t[tid, 3] - tile_start - lane), self.lanes, rounding_mode="floor"),
                            0, self.steps)
        return bitpos, tid << self.maxlen, t[tid, 2] + tile_start + lane, count

    def decode(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """-> int16 bits [n] (into out[:n] when given)."""
        out = torch.empty(self.n, dtype=torch.int16, device=self.words.device) if out is None else out[:self.n]
        if self.words.is_cuda and _triton_codec() is not None:
            _decode_triton(self, out)
        else:
            _decode_torch(self, out)
        return out


def _join(sym: torch.Tensor, raw: torch.Tensor, dtype: str) -> torch.Tensor:
    s, r = sym.to(torch.int32), raw.to(torch.int32)
    bits = ((r & 0x80) << 8) | (s << 7) | (r & 0x7F) if dtype == "bfloat16" else (s << 8) | r
    return bits.to(torch.int16)  # wraps like a C cast: the 16 bits are kept


@functools.cache
def _triton_codec():
    """dn_torch._triton_codec, or None without Triton. Loaded on first use on CUDA, not with dn_torch: importing it
    imports Triton (optional, heavy) and defines every @triton.jit kernel."""
    try:
        return importlib.import_module("dn_torch._triton_codec")
    except ImportError:  # Triton only where a GPU backend is installed
        return None


def _decode_torch(p: PackedLayer, out: torch.Tensor) -> None:
    """Every lane one symbol per step; lanes past their count decode garbage that lands in the padding
    of their tile and is sliced away. Step s of all lanes is row s of a [steps, streams] matrix, which
    is already in output order once viewed as [steps, tiles, lanes] and transposed to tile-major."""
    pos, lut_base, _, _ = p.stream_meta()
    if pos.numel() == 0:
        return
    m = p.maxlen
    # 64-bit windows: window word i = words[i] << 32 | words[i+1]; zero padding for the garbage reads.
    w = torch.cat([p.words.long() & _MASK32, pos.new_zeros(p.steps * m // 32 + 3)])
    w64 = (w[:-1] << 32) | w[1:]
    luts = p.luts.long() & 0xFFFF
    shift = pos.new_full((), 64 - m)
    syms = torch.empty(p.steps, pos.numel(), dtype=torch.uint8, device=out.device)
    for s in range(p.steps):
        window = (w64[pos >> 5] >> (shift - (pos & 31))) & ((1 << m) - 1)  # arithmetic shift: masked after
        entry = luts[lut_base + window]
        syms[s] = entry
        pos += entry >> 8
    tiles = syms.view(p.steps, -1, p.lanes).transpose(0, 1).reshape(-1)  # [tiles * steps * lanes]
    tile_elems = p.lanes * p.steps
    parts = [tiles[int(first) // p.lanes * tile_elems:][:int(n)] for first, _, _, n in p.table.tolist()]
    out.copy_(_join(torch.cat(parts), p.raw, p.dtype))


def _decode_triton(p: PackedLayer, out: torch.Tensor) -> None:
    pos, lut_base, out_base, count = p.stream_meta()
    _triton_codec().decode(p.words, p.luts, p.raw, pos, lut_base, out_base, count, out,
                         p.lanes, p.steps, p.maxlen, p.dtype == "bfloat16")


def decode(enc: lossless.EncodedTensor, device=None) -> torch.Tensor:
    """Bits (int16, original shape) of one coded tensor; Triton on CUDA, pure torch elsewhere."""
    return PackedLayer(lossless.pack({"": enc})).to(device or "cpu").decode().reshape(enc.shape)


def decode_reference(enc: lossless.EncodedTensor, device=None) -> torch.Tensor:
    """The pure-torch path, on any device."""
    p = PackedLayer(lossless.pack({"": enc})).to(device or "cpu")
    out = torch.empty(p.n, dtype=torch.int16, device=p.words.device)
    _decode_torch(p, out)
    return out.reshape(enc.shape)


class CodecLinear(nn.Module):
    """nn.Linear whose weight is held in the runtime layout fixed4 (dn.formats.fixed4, converted at load from the
    stored Huffman code) and decoded on access into one scratch buffer shared by every projection (the largest
    projection's size: the model holds one decoded projection at a time). Decoding per projection keeps the
    decoded weight in cache for the matmul that follows. The weights are the stored bits exactly, so logits
    equal the dense model's bit for bit.
    DN_CODEC_FUSED=1 (off by default) sends CPU inputs of at most 4 rows (decode steps) through the C fused
    decode+GEMV instead: no decoded copy, but float32 sums in another order, so logits differ in the last bits."""

    def __init__(self, rt: fixed4.Lossless, scratch: list, start: int, bias):
        super().__init__()
        self.coded, self.shape, self.n, self._scratch, self.start = rt.dtype, tuple(rt.shape), rt.n, scratch, start
        for name, a in zip(_FIXED4, fixed4.buffers(rt)):
            t = torch.from_numpy(np.require(a, requirements=["C", "W"]))
            self.register_buffer(name, t.to(scratch[0].device))
        self.bias, self.fused = bias, False

    @property
    def weight(self) -> torch.Tensor:
        """The decoded weight, valid until any coded projection's weight is read again (they share the scratch):
        copy it to keep it."""
        out = self._scratch[0][self.start:self.start + self.n]
        _decode_into(self, out)
        return out.view(self.shape)

    def forward(self, x):
        fused = self.fused or os.environ.get("DN_CODEC_FUSED") == "1"
        if fused and x.device.type == "cpu" and x.numel() <= 4 * self.shape[1]:
            y = matvec_fixed4(self, x.reshape(-1, self.shape[1])).to(x.dtype).reshape(*x.shape[:-1], self.shape[0])
            return y if self.bias is None else y + self.bias
        return nn.functional.linear(x, self.weight, self.bias)


_FIXED4 = ("table", "nibbles", "raw", "esc_index", "esc_symbol")


def decode_fixed4(f) -> torch.Tensor:
    """Bits (int16, the weight's shape) of a CodecLinear's fixed4 weight."""
    return _decode_into(f, torch.empty(f.n, dtype=torch.int16, device=f.raw.device)).view(f.shape)


def from_encoded(enc: lossless.EncodedTensor, fused: bool = False) -> CodecLinear:
    """A stored tensor -> a CodecLinear holding it in fixed4 with its own scratch (tests, benchmarks); fused:
    route decode steps through the fused kernel, as DN_CODEC_FUSED=1 does."""
    lossless.verify(enc, "<argument>")
    rt = fixed4.convert(enc, torch.get_num_threads())
    lin = CodecLinear(rt, [torch.empty(rt.n, dtype=DTYPES[rt.dtype])], 0, None)
    lin.fused = fused
    return lin


def _decode_into(f, out: torch.Tensor) -> torch.Tensor:
    """f: a module holding a fixed4 tensor's buffers (CodecLinear); out: [n] int16 bits, or values at the coded
    dtype or float32 (exact upcast). CPU: the C kernel (dn/formats/csrc/codec_runtime.c), else the pure-torch path."""
    if out.is_cuda:
        return _decode_fixed4_cuda(f, out)
    lib = fixed4.native() if out.device.type == "cpu" else None
    coded = DTYPES[f.coded]
    if lib is not None and out.dtype in (torch.int16, coded, torch.float32) and out.is_contiguous():
        fixed4.decode_native(lib, f, out.dtype == torch.float32, torch.get_num_threads(), out, f.coded)
        return out
    return _plain_into(f, out)


def _plain_into(f, out: torch.Tensor) -> torch.Tensor:
    """_decode_plain's bits into out: as bits, or at out's dtype (an exact upcast, as the dense loader makes)."""
    bits = _decode_plain(f)
    return out.copy_(bits if out.dtype == torch.int16 else bits.view(DTYPES[f.coded]))


def _decode_fixed4_cuda(f, out: torch.Tensor) -> torch.Tensor:
    """CUDA: the Triton fixed4 decode (dn_torch/_triton_codec.py, bit-exact) straight into out when out holds bits,
    the coded dtype or float32, else through int16 bits; the pure-torch path where Triton is missing."""
    coded, triton_codec = DTYPES[f.coded], _triton_codec()
    if triton_codec is None:
        return _plain_into(f, out)
    if out.dtype in (torch.int16, coded, torch.float32) and out.is_contiguous():
        return triton_codec.fixed4_decode(f, out)
    return out.copy_(triton_codec.fixed4_decode(f).view(coded))  # the other 16-bit float: converted as Tensor.to


def _decode_plain(f) -> torch.Tensor:
    """The plain path on any device -> int16 bits [n]. One gather per nibble byte from a 256-entry table of both
    its elements' shifted symbols (int32 = two int16 in element order), the raw bits or-ed in, escapes patched."""
    shift = 7 if f.coded == "bfloat16" else 8
    b = torch.arange(256, device=f.table.device)
    t = f.table.to(torch.int32)
    pair = (t[b & 15] << shift) | (t[b >> 4] << (16 + shift))
    sym = pair[f.nibbles.long()].view(torch.int16)[:f.n]
    raw = f.raw.to(torch.int16)
    bits = sym | (((raw & 0x80) << 8) | (raw & 0x7F) if f.coded == "bfloat16" else raw)  # int16: 0x80 << 8 wraps
    idx = f.esc_index.long()
    bits[idx] = _join(f.esc_symbol, f.raw[idx], f.coded)
    return bits


def attach(model, model_dir: Path, spec) -> None:
    """Replace the coded projections of every decoder layer by CodecLinear. A layer's coded tensors are read
    (dn.formats.fixed4.read_layers: the codec file opened once), converted to fixed4 and moved to the device
    before the next layer's are read, so the stored Huffman code is never resident."""
    index = lossless.load_index(model_dir)
    ref = next(p for p in model.parameters() if not p.is_meta and p.is_floating_point())  # device, dtype
    scratch = [torch.empty(max(h["n"] for h in index.values()), dtype=ref.dtype, device=ref.device)]  # shared
    model.register_buffer("dn_codec_scratch_weights", scratch[0], persistent=False)
    layers = model.model.layers
    skip = {i for i, layer in enumerate(layers) if getattr(layer, "elsewhere", False)}  # a pipeline rank's others
    for coded in fixed4.read_layers(model_dir, len(layers), torch.get_num_threads(), skip):
        for name, rt in coded.items():
            # "model.layers.3.self_attn.q_proj.weight" -> parent "layers.3.self_attn", attribute "q_proj"
            parent, attr = name.removeprefix("model.").removesuffix(".weight").rsplit(".", 1)
            module = model.model.get_submodule(parent)
            setattr(module, attr, CodecLinear(rt, scratch, 0, getattr(module, attr).bias))


def matvec(enc: lossless.EncodedTensor, x: torch.Tensor) -> torch.Tensor:
    """y = x @ W.T for x [B, in]: decode then matmul (the fused Triton kernel is in _triton_codec)."""
    if x.is_cuda and _triton_codec() is not None:
        return _triton_codec().matvec(PackedLayer(lossless.pack({"": enc})).to(x.device), x, enc.shape)
    w = decode(enc, x.device).view(torch.bfloat16 if enc.dtype == "bfloat16" else torch.float16)
    return x @ w.to(x.dtype).T


def matvec_fixed4(f, x: torch.Tensor) -> torch.Tensor:
    """y = x @ W.T for a CodecLinear's fixed4 weight and x [B, in]: the C fused decode+GEMV on CPU for B <= 4
    (float32 accumulation, escapes as a second pass: close to F.linear, not bit-identical, so the runtime does
    not use it), else decode then matmul. Returns float32 from the fused kernel, x's dtype otherwise."""
    lib = fixed4.native() if x.device.type == "cpu" else None
    if lib is None or not 1 <= x.shape[0] <= 4:
        return nn.functional.linear(x, f.weight.to(x.dtype))
    threads, y = torch.get_num_threads(), torch.empty(x.shape[0], f.shape[0], dtype=torch.float32)
    bf16 = x.dtype == torch.bfloat16 and f.coded == "bfloat16"  # exact bf16 products, no float32 copy of W or x
    if bf16 and fixed4.matvec_native_bf16(lib, f, x.contiguous().view(torch.int16), threads, f.coded, y) \
            is not None:
        return y
    return fixed4.matvec_native(lib, f, x.float().contiguous(), threads, f.coded, y)
