"""Each backend runs the real default model and matches the numpy reference of the spec."""

import numpy as np
import pytest

from dn.core.tolerances import PARITY
from dn.model import reference
from dn.runtime.generation import generate_tokens, prompt_ids


@pytest.mark.parametrize("layer", [0, 29])
def test_decoder_layer_matches_numpy_reference(backend, loaded, default_model_dir, default_spec, prompt_tokens,
                                               layer):
    hidden = backend.hidden_states(loaded, prompt_tokens)
    assert len(hidden) == default_spec.architecture.num_hidden_layers + 1
    w = reference.layer_weights(default_model_dir, default_spec, layer)
    ref = reference.decoder_layer(hidden[layer], w, default_spec.architecture)
    err = np.abs(ref - hidden[layer + 1]).max() / np.abs(ref).max()
    assert err < PARITY["float32"].hidden_rel_err


def test_cached_decoding_matches_full_forward(backend, loaded, prompt_tokens):
    full = backend.logits(loaded, prompt_tokens)
    assert full.shape == (1, prompt_tokens.shape[1], 49152) and full.dtype == np.float32
    cache = backend.make_cache(loaded)
    backend.logits(loaded, prompt_tokens[:, :-3], cache)
    steps = [backend.logits(loaded, prompt_tokens[:, i:i + 1], cache, last_only=True)[0, -1]
             for i in range(prompt_tokens.shape[1] - 3, prompt_tokens.shape[1])]
    np.testing.assert_allclose(np.stack(steps), full[0, -3:], rtol=1e-4, atol=1e-3)


def test_token_nll_matches_logits(backend, loaded, prompt_tokens):
    nll = backend.token_nll(loaded, prompt_tokens)
    logits = backend.logits(loaded, prompt_tokens)[0, :-1].astype(np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    expected = lse - logits[np.arange(len(logits)), prompt_tokens[0, 1:]]
    np.testing.assert_allclose(nll[0], expected, rtol=1e-3, atol=1e-3)  # float32 logsumexp


def test_answers_paris(backend, loaded, tokenizer):
    ids = prompt_ids(tokenizer, "What is the capital of France?", raw=False)
    out = tokenizer.decode(list(generate_tokens(backend, loaded, ids, 24, eos_ids=tokenizer.eos_ids)))
    assert "Paris" in out
