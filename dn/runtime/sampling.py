"""Choosing the next token from numpy logits, as mlx-lm's make_sampler does: temperature, top-p, min-p, top-k.

Backend-free (numpy only). The filters act on the untempered log-probabilities, in mlx-lm's order (top-p,
then min-p, then top-k); the temperature then scales what is left. Temperature 0 is greedy.
"""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def filter_logprobs(logprobs: np.ndarray, top_p: float = 1.0, min_p: float = 0.0, top_k: int = 0) -> np.ndarray:
    """logprobs [V] -> a copy with the tokens the filters drop at -inf; the most likely token always stays.
    top_p (off at 1): keep the smallest set of most likely tokens whose probability reaches top_p.
    min_p (off at 0): keep tokens whose probability is at least min_p times the most likely one's.
    top_k (off at 0): keep the k most likely tokens."""
    x = np.array(logprobs, dtype=np.float64)
    if 0 < top_p < 1:
        order = np.argsort(-x, kind="stable")
        p = np.exp(x[order] - x[order[0]])
        p /= p.sum()
        above = np.cumsum(p) - p  # mass of the tokens ranked above each one
        x[order[above >= top_p]] = -np.inf
    if min_p > 0:
        x[x < x.max() + np.log(min_p)] = -np.inf
    if 0 < top_k < x.size:
        x[np.argsort(-x, kind="stable")[top_k:]] = -np.inf
    return x


def sample(logits: np.ndarray, temp: float, rng: np.random.Generator, top_p: float = 1.0, min_p: float = 0.0,
           top_k: int = 0) -> int:
    """logits [V] -> token id; temp 0 is greedy (the filters then change nothing)."""
    if temp == 0:
        return int(np.argmax(logits))
    z = filter_logprobs(log_softmax(logits), top_p, min_p, top_k) / temp
    p = np.exp(z - z.max())
    return int(rng.choice(len(p), p=p / p.sum()))
