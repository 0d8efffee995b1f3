"""A prompt costs its KV cache, not its logits: generate_tokens asks for the last position's logits only, in prompt
steps of PREFILL_STEP, and each backend then never holds the prompt's [T, V] logits (its peak, in a fresh
process, stays well below their size, where asking for every position's logits does not)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from dn.runtime import generation


class _Spy:
    """A backend that records what generate_tokens asks of it."""

    NAME = "spy"

    def __init__(self, vocab=7):
        self.calls, self.vocab = [], vocab

    def make_cache(self, model, max_kv_size=None, kv_bits=None):
        return []

    def logits(self, model, tokens, cache=None, last_only=False):
        self.calls.append((tokens.copy(), last_only))
        cache.extend(tokens[0].tolist())
        return np.zeros((1, 1 if last_only else tokens.shape[1], self.vocab), np.float32)


STEP = generation.PREFILL_STEP


@pytest.mark.parametrize("length,max_kv", [(1, None), (STEP, None), (2 * STEP + 300, None), (1300, 200)])
def test_prefill_in_steps_last_position_only(length, max_kv):
    be, prompt = _Spy(), list(range(length))
    out = list(generation.generate_tokens(be, None, prompt, 3, max_kv_size=max_kv))
    assert len(out) == 3 and all(last for _, last in be.calls)
    pre = be.calls[:-2]  # then two decode steps of one token each
    assert np.concatenate([t[0] for t, _ in pre]).tolist() == prompt
    assert all(t.shape[1] <= min(max_kv or generation.PREFILL_STEP, generation.PREFILL_STEP) for t, _ in pre)
    assert [t.shape for t, _ in be.calls[-2:]] == [(1, 1), (1, 1)]


_PROBE = """
import json, sys
import numpy as np
from dn.runtime import generation, loader, memory
run = loader.load(None, sys.argv[1], "auto")
be, model, T = run.backend, run.model, int(sys.argv[2])
ids = np.random.default_rng(0).integers(100, 20000, T).tolist()
list(generation.generate_tokens(be, model, ids[:8], 2))  # first-call costs (kernels, buffers) out of the peaks
mon = memory.Monitor(be, run.memory)
mon.reset()
list(generation.generate_tokens(be, model, ids, 1))
steps = mon.peak()
mon.reset()
every = be.logits(model, np.array([ids]), be.make_cache(model))
last = be.logits(model, np.array([ids]), be.make_cache(model), last_only=True)
print(json.dumps({"steps": steps, "every": mon.peak(), "shape": last.shape, "every_shape": every.shape,
                  "vocab": run.spec.architecture.vocab_size}))
"""


def test_prompt_peak_is_not_its_logits(backend_name):
    """A prompt on the default model: [1, 1, V] logits from a prefill step, and a peak at least half of the prompt's
    float32 logits (T x V x 4) below that of one forward asking for every position's logits (the same prompt, KV
    cache and activations): the [T, V] logits are never made. T is small: MLX on a CPU is slow."""
    t = 128
    proc = subprocess.run([sys.executable, "-c", _PROBE, backend_name, str(t)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    v = seen["vocab"]
    assert seen["shape"] == [1, 1, v] and seen["every_shape"] == [1, t, v]
    assert seen["every"] - seen["steps"] > 0.5 * t * v * 4, seen
