"""Generation as mlx-lm users drive it: sampling filters, bounded and quantized KV caches, `dn chat`, stdin prompts,
system prompts, quiet runs; through the CLI in-process (dn.cli.main) where a user would type it."""

import io
import sys

import numpy as np
import pytest
from helpers import run_dn

from dn import cli
from dn.core.errors import DnError
from dn.core.tolerances import PARITY
from dn.runtime import sampling
from dn.runtime.generation import generate_tokens, prompt_ids


def dn_main(capsys, *args):
    try:
        rc = cli.main(list(args))
    except SystemExit as e:  # argparse
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


# --- sampling (numpy, backend-free) ---

LOGITS = np.log(np.array([0.05, 0.5, 0.1, 0.3, 0.05]))  # probabilities, ranked: 1, 3, 2, then 0 and 4


def kept(**kw) -> set[int]:
    return set(np.flatnonzero(np.isfinite(sampling.filter_logprobs(sampling.log_softmax(LOGITS), **kw))).tolist())


def test_top_p_keeps_the_smallest_set_reaching_p():
    assert kept(top_p=0.5) == {1}
    assert kept(top_p=0.75) == {1, 3}
    assert kept(top_p=0.85) == {1, 3, 2}
    assert kept(top_p=1.0) == {0, 1, 2, 3, 4}  # off


def test_min_p_is_relative_to_the_most_likely():
    assert kept(min_p=0.5) == {1, 3}  # p >= 0.5 * 0.5
    assert kept(min_p=0.2) == {1, 3, 2}  # p >= 0.1
    assert kept(min_p=1.0) == {1}


def test_top_k_and_filters_compose_in_mlx_lm_order():
    assert kept(top_k=2) == {1, 3}
    assert kept(top_k=1) == {1}
    assert kept(top_p=0.85, top_k=2) == {1, 3}
    assert kept(top_k=99) == {0, 1, 2, 3, 4}


def test_sampling_respects_filters_and_top_k_1_is_greedy():
    rng = np.random.default_rng(0)
    logits = np.random.default_rng(1).normal(size=200) * 3
    greedy = int(np.argmax(logits))
    assert all(sampling.sample(logits, 5.0, rng, top_k=1) == greedy for _ in range(50))
    assert sampling.sample(logits, 0.0, rng, top_p=0.1, top_k=7) == greedy
    draws = {sampling.sample(LOGITS, 1.0, rng, top_p=0.75) for _ in range(300)}
    assert draws == {1, 3}
    draws = [sampling.sample(LOGITS, 1.0, rng) for _ in range(4000)]  # unfiltered: the distribution itself
    assert abs(draws.count(1) / 4000 - 0.5) < 0.04


# --- KV cache bounds and quantization, on each backend ---

def _teacher_forced(backend, model, cache, ids, steps):
    """Prefill ids, then feed steps one at a time; the logits after each."""
    out = [backend.logits(model, np.array([ids]), cache, last_only=True)[0, -1]]
    out += [backend.logits(model, np.array([[t]]), cache, last_only=True)[0, -1] for t in steps]
    return np.stack(out)


def test_max_kv_size_bounds_the_cache(backend, loaded, tokenizer):
    ids = tokenizer.encode("The history of the printing press begins in the fifteenth century")
    steps = tokenizer.encode(" when Johannes Gutenberg combined movable metal type, oil-based ink")[:10]
    full = _teacher_forced(backend, loaded, backend.make_cache(loaded), ids, steps)
    wide = _teacher_forced(backend, loaded, backend.make_cache(loaded, max_kv_size=64), ids, steps)
    np.testing.assert_allclose(wide, full, rtol=1e-4, atol=1e-3)  # never reached: the same
    w = len(ids) + 3
    cache = backend.make_cache(loaded, max_kv_size=w)
    bounded = _teacher_forced(backend, loaded, cache, ids, steps)
    np.testing.assert_allclose(bounded[:4], full[:4], rtol=1e-4, atol=1e-3)  # within the window: the same
    assert np.abs(bounded[5:] - full[5:]).max() > 1e-2  # beyond it, earlier tokens are no longer seen
    layer = cache.layers[0] if backend.NAME == "torch" else cache[0]
    assert layer.keys.shape[-2] <= w


def test_rotating_caches_agree_across_backends(tokenizer, default_model_dir, default_spec):
    """Both backends keep mlx-lm's set (the first 4 tokens and the latest): the same logits past the window."""
    from dn.runtime import backend as backends

    ids = tokenizer.encode("Water boils at 100 degrees Celsius at sea level")
    steps = tokenizer.encode(", but at higher altitudes the air pressure is lower, so the boiling point")[:12]
    out = {}
    for name in ("mlx", "torch"):
        try:
            be = backends.get(name)
        except DnError:
            pytest.skip(f"backend {name} not available")
        model = be.load(default_model_dir, default_spec, "float32")
        out[name] = _teacher_forced(be, model, be.make_cache(model, max_kv_size=len(ids) + 2), ids, steps)
    err = np.abs(out["mlx"] - out["torch"]).max(-1) / np.abs(out["mlx"]).max(-1)
    assert err.max() < PARITY["float32"].max_rel_err, err


def test_kv_bits(backend, loaded, tokenizer):
    ids = prompt_ids(tokenizer, "What is the capital of France?", raw=False)
    greedy = list(generate_tokens(backend, loaded, ids, 6))
    if backend.NAME == "torch":
        from transformers.utils import is_hqq_available, is_optimum_quanto_available

        if not (is_optimum_quanto_available() or is_hqq_available()):
            with pytest.raises(DnError, match="pip install optimum-quanto"):
                backend.make_cache(loaded, kv_bits=4)
            return
    assert list(generate_tokens(backend, loaded, ids, 6, kv_bits=8)) == greedy
    with pytest.raises(DnError, match="do not combine"):
        backend.make_cache(loaded, max_kv_size=16, kv_bits=4)


def test_long_prompt_under_max_kv_size_is_prefilled_in_windows(tokenizer):
    """generate_tokens feeds a prompt longer than max_kv_size a window at a time."""
    calls = []

    class Fake:
        def make_cache(self, model, max_kv_size=None, kv_bits=None):
            return []

        def logits(self, model, tokens, cache, last_only=False):
            calls.append(tokens.shape[1])
            return np.zeros((1, 1, 8))

    assert list(generate_tokens(Fake(), None, list(range(25)), 2, max_kv_size=10)) == [0, 0]
    assert calls == [10, 10, 5, 1]  # the last token is not fed: nothing would read its logits
    with pytest.raises(DnError, match="empty"):
        list(generate_tokens(Fake(), None, [], 2))


# --- the CLI ---

def test_generate_flags_stdin_and_quiet(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is the capital of France?\n"))
    rc, out, err = dn_main(capsys, "generate", "--backend", "torch", "--prompt", "-", "--max-tokens", "8",
                           "--temp", "0.7", "--top-p", "0.9", "--min-p", "0.05", "--top-k", "20",
                           "--max-kv-size", "64", "-q")
    assert rc == 0 and out.strip() and err == ""
    rc, out, err = dn_main(capsys, "generate", "--backend", "torch", "--prompt", "What is the capital of France?",
                           "--max-tokens", "8", "--system-prompt", "Answer in French.", "--verbose", "true")
    assert rc == 0 and out.strip() and "tok/s" in err


def test_system_prompt_is_a_system_message(tokenizer):
    plain = tokenizer.decode(prompt_ids(tokenizer, "Hi", raw=False))
    system = tokenizer.decode(prompt_ids(tokenizer, "Hi", raw=False, system_prompt="Talk like a pirate."))
    assert "Talk like a pirate." in system and "Talk like a pirate." not in plain
    with pytest.raises(DnError, match="needs a chat template"):
        prompt_ids(tokenizer, "Hi", raw=True, system_prompt="x")


@pytest.mark.parametrize(("args", "needle"), [
    (["generate", "--top-p", "1.5"], "expected a number in [0, 1]"),
    (["generate", "--min-p", "-0.1"], "expected a number in [0, 1]"),
    (["generate", "--top-k", "-1"], "expected an integer >= 0"),
    (["generate", "--kv-bits", "7"], "invalid choice"),
    (["chat", "--kv-bits", "4", "--max-kv-size", "64"], "do not combine"),
    (["generate", "--verbose", "maybe"], "expected true or false"),
    (["generate", "--raw", "--system-prompt", "x", "--backend", "torch"], "needs a chat template"),
])
def test_bad_generation_flags_are_one_line(capsys, args, needle):
    rc, out, err = dn_main(capsys, *args)
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1 and needle in err, err


def test_stdin_prompt_empty_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    rc, out, err = dn_main(capsys, "generate", "--prompt", "-")
    assert rc == 2 and out == "" and err.strip() == "dn: error: --prompt -: stdin is empty"


def test_chat_keeps_the_conversation(capsys, monkeypatch, tokenizer):
    """Each line is a turn over the whole history: each reply equals a fresh generation over the rendered
    history, while only the new turn is prefilled (the cache of the turns before is reused); /exit ends."""
    import re

    monkeypatch.setattr(sys, "stdin", io.StringIO("My name is Ada.\n\nWhat is my name?\n/exit\nnever read\n"))
    rc, out, err = dn_main(capsys, "chat", "--backend", "torch", "--dtype", "float32", "--max-tokens", "12",
                           "--system-prompt", "Answer briefly.")
    assert rc == 0
    replies, prefilled = out.splitlines(), [int(n) for n in re.findall(r"prompt (\d+) tokens", err)]
    assert len(replies) == len(prefilled) == 2, (replies, err)

    from dn.runtime import loader

    run = loader.load(None, "torch", "float32")
    history = [{"role": "system", "content": "Answer briefly."}]
    for line, reply in zip(("My name is Ada.", "What is my name?"), replies):
        history.append({"role": "user", "content": line})
        ids = tokenizer.encode(tokenizer.apply_chat_template(history), add_special_tokens=False)
        fresh = tokenizer.decode(list(generate_tokens(run.backend, run.model, ids, 12, eos_ids=tokenizer.eos_ids)))
        assert fresh == reply
        history.append({"role": "assistant", "content": reply})
    assert prefilled[0] == len(tokenizer.encode(tokenizer.apply_chat_template(history[:2]),
                                                add_special_tokens=False))
    assert prefilled[1] < 20  # the new turn only, not the ~40 tokens of the history


def test_chat_ends_at_end_of_input(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("/reset\n"))
    rc, out, err = dn_main(capsys, "chat", "--backend", "torch", "-q")
    assert rc == 0 and out == "" and err == "conversation reset: history and cache cleared\n"


def test_torch_generate_prints_no_future_warning():
    """transformers 5.x deprecates past_key_values (gone in 5.40): dn passes the cache by its new name."""
    proc = run_dn("generate", "--backend", "torch", "--max-tokens", "2", "-q")
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr
