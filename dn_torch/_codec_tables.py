"""Per-tensor decode tables of the Triton kernels, derived from a pack's LUTs (numpy; no Triton needed,
so the table arithmetic is tested everywhere). See dn_torch/_triton_codec.py for how they are used."""

import weakref

import numpy as np
import torch

_TABLE_W = 32  # per-length tables are [T, 32]: index L = 1..MAXLEN
_tables_cache: dict[int, tuple] = {}


def tables_np(luts: np.ndarray, maxlen: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From the LUTs (uint16 [T, 2**maxlen]): left-justified first code per length, rank delta per
    length, and the symbols in canonical order. Absent lengths repeat the next start, so the count
    of starts <= window is the code length."""
    t = luts.shape[0]
    ljs = np.full((t, _TABLE_W), 1 << 30, np.int32)
    delta = np.zeros((t, _TABLE_W), np.int32)
    syms = np.zeros((t, 256), np.int32)
    for k in range(t):
        ln, sym = (luts[k] >> 8).astype(np.int64), (luts[k] & 0xFF).astype(np.int32)
        for L in range(1, maxlen + 1):
            shorter = (ln > 0) & (ln < L)
            ljs[k, L] = np.count_nonzero(shorter)
            n_shorter = int((1 << ln[shorter]).sum()) >> maxlen  # each code of length l fills 2**(m-l) entries
            delta[k, L] = n_shorter - (int(ljs[k, L]) >> (maxlen - L))
        idx = np.flatnonzero(ln > 0)
        syms[k, delta[k, ln[idx]] + (idx >> (maxlen - ln[idx]))] = sym[idx]
    return ljs, delta, syms


def tables(luts: torch.Tensor, maxlen: int):
    """Device tables for a pack's LUTs, cached while the LUT tensor lives."""
    hit = _tables_cache.get(id(luts))
    if hit is not None and hit[0]() is luts:
        return hit[1]
    arr = luts.cpu().numpy().view(np.uint16).reshape(-1, 1 << maxlen)
    tabs = tuple(torch.from_numpy(a).to(luts.device) for a in tables_np(arr, maxlen))
    _tables_cache[id(luts)] = (weakref.ref(luts), tabs)
    weakref.finalize(luts, _tables_cache.pop, id(luts), None)  # the entry dies with the layer
    return tabs


