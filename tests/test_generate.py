"""Sampling: KV-cached and uncached generation draw the same tokens; options and errors."""

import numpy as np
import pytest

from npformer.generate import generate, generate_seq2seq, next_token_distribution
from npformer.models import build_model
from npformer.presets import tiny_config


def _model(name, **overrides):
    model = build_model(tiny_config(name, **overrides), seed=3)
    rng = np.random.default_rng(0)
    for value in model.parameters().values():  # peaked, unusual distributions
        value[...] += 0.3 * rng.standard_normal(value.shape)
    return model


@pytest.mark.parametrize("name", ["gpt2", "gpt-j", "gpt-neox", "palm", "llama2", "gpt3"])
def test_cached_and_uncached_generation_give_identical_tokens(name):
    # 40 new tokens with max_seq_len 16: the context fills up and is shifted twice
    model = _model(name)
    prompt = [1, 2, 3]
    for temperature, top_k in ((1.0, None), (0.7, 3), (0.0, None)):
        cached = generate(model, prompt, 40, temperature=temperature, top_k=top_k, seed=5)
        uncached = generate(model, prompt, 40, temperature=temperature, top_k=top_k, seed=5,
                            use_cache=False)
        assert cached == uncached
        assert len(cached) == 40 and all(0 <= t < model.config.vocab_size for t in cached)


def test_same_seed_same_tokens_other_seed_other_tokens():
    model = _model("llama2")
    a = generate(model, [4], 30, seed=1)
    assert a == generate(model, [4], 30, seed=1)
    assert a != generate(model, [4], 30, seed=2)


def test_greedy_is_the_argmax_of_a_full_forward():
    model = _model("gpt2")
    new = generate(model, [1, 5, 2], 1, temperature=0.0)
    logits = model.forward(np.array([[1, 5, 2]]))
    assert new == [int(np.argmax(logits[0, -1]))]


def test_top_k_keeps_the_k_largest_and_renormalises():
    z = np.array([0.1, 2.0, -1.0, 1.5, 0.3])
    p = next_token_distribution(z, 1.0, 2)
    assert np.count_nonzero(p) == 2 and p[1] > p[3] > 0
    e = np.exp(z[[1, 3]])
    np.testing.assert_allclose(p[[1, 3]], e / e.sum(), rtol=1e-15)
    # temperature sharpens: τ → small puts (almost) all mass on the argmax
    assert next_token_distribution(z, 0.01, None)[1] > 0.999999


def test_kv_cached_logits_equal_full_forward():
    model = _model("llama3").eval()
    ids = np.array([[1, 2, 3, 4, 5, 6]])
    full = model.forward(ids)
    caches = model.new_kv_caches()
    pieces = [model.forward(ids[:, :2], kv_caches=caches)]
    pieces += [model.forward(ids[:, t:t + 1], kv_caches=caches) for t in range(2, 6)]
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=0, atol=1e-13)


def test_encoder_decoder_generation_is_deterministic():
    model = _model("transformer-2017", dropout=0.0)
    a = generate_seq2seq(model, [1, 2, 3], 20, seed=4)
    assert a == generate_seq2seq(model, [1, 2, 3], 20, seed=4) and len(a) == 20
    greedy = generate_seq2seq(model, [1, 2, 3], 1, temperature=0.0)
    logits = model.forward(np.array([[1, 2, 3]]), np.array([[3]]))
    assert greedy == [int(np.argmax(logits[0, -1]))]


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=2.5), "top_k"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(_model("gpt2"), [1], 3, **kwargs)


def test_bad_prompt_and_length():
    model = _model("gpt2")
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [], 3)
    with pytest.raises(ValueError, match="tokens"):
        generate(model, [1], -1)
    with pytest.raises(ValueError, match="ids must lie in"):
        generate(model, [99], 3)


def test_a_tiny_temperature_is_the_greedy_limit_not_nan():
    # z / τ overflowed to ±inf (and inf − inf = NaN in the softmax) for τ = 5e-324
    z = np.array([0.1, 2.0, -1.0, 1.5, 0.3])
    for tau in (1e-300, 5e-324):
        p = next_token_distribution(z, tau, None)
        np.testing.assert_array_equal(p, np.eye(5)[1])
    model = _model("gpt2")
    greedy = generate(model, [1, 2], 8, temperature=0.0)
    assert generate(model, [1, 2], 8, temperature=5e-324, seed=3) == greedy


def test_softmax_of_shifted_logits_is_unchanged():
    # a guard on the overflow fix: subtracting max z must not change the distribution
    z = np.array([300.0, 301.0, 299.5, -20.0])
    e = np.exp(z - 301.0)
    np.testing.assert_allclose(next_token_distribution(z, 1.0, None), e / e.sum(), rtol=1e-15)


def test_nan_logits_are_named_not_drawn_from():
    from npformer._validate import NonFiniteError
    from npformer.generate import draw

    with pytest.raises(NonFiniteError, match="logits contain 1 NaN or infinite"):
        draw(np.array([0.1, np.nan, 0.3]), 1.0, None, np.random.default_rng(0))


def test_a_negative_seed_is_named():
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        generate(_model("gpt2"), [1], 3, seed=-1)


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_one_position_model_samples_from_its_last_token(use_cache):
    # max_seq_len = 1: dropping "the oldest half" of a full context left nothing
    model = _model("gpt2", max_seq_len=1)
    new = generate(model, [1, 2, 3], 6, temperature=0.0, use_cache=use_cache)
    context = [3]
    for token in new:  # each step is the argmax given only the previous token
        assert token == int(np.argmax(model.forward(np.array([context[-1:]]))[0, -1]))
        context.append(token)
