"""DecoderLM: gradient accumulation, tied embeddings, the pure (cache-as-value) forms,
KV-cached decoding, the inputs_embeds path, dropout modes, float32, and bad input."""

import numpy as np
import pytest

from helpers import assert_close
from npformer.models import DecoderLM
from npformer.presets import tiny_config

F64 = np.float64


def make(name="gpt2", seed=0, **overrides):
    return DecoderLM(tiny_config(name, **overrides), seed=seed)


def scramble(model, rng, std=0.3):
    """Unusual random weights (norm weights around 1), so every path carries a real signal."""
    for name, p in model.parameters().items():
        base = 1.0 if name.endswith("norm.weight") else 0.0
        p[...] = (base + std * rng.standard_normal(p.shape)).astype(p.dtype)


def grads_copy(model):
    return {n: g.copy() for n, g in model.gradients().items()}


def assert_grads_close(actual, expected, dtype=F64):
    """Every gradient tensor within the parity tolerance of ``dtype``. The key biases'
    gradients are structurally zero (softmax ignores a shift shared by a whole row of scores,
    see test_presets.py) and come out as rounding noise ~1e-19, so every tensor also gets an
    absolute slack of 1e-14 x the largest gradient of the model."""
    assert set(actual) == set(expected)
    scale = max(float(np.max(np.abs(g))) for g in expected.values())
    for n, g in actual.items():
        assert_close(g, expected[n], dtype, n, atol=1e-14 * scale)


def batch(rng, B=2, T=7, V=11):
    return rng.integers(0, V, (B, T))


# ---- gradient bookkeeping ------------------------------------------------------------------


def test_zero_grad_zeroes_everything():
    model = make("gpt-j").eval()
    rng = np.random.default_rng(0)
    logits = model.forward(batch(rng))
    model.backward(rng.standard_normal(logits.shape))
    grads = model.gradients()
    assert set(grads) == set(model.parameters())
    assert all(np.any(g != 0) for g in grads.values())
    model.zero_grad()
    assert all(np.all(g == 0) for g in model.gradients().values())
    # the same arrays are zeroed in place (an optimiser may hold them)
    assert all(model.gradients()[n] is g for n, g in grads.items())


@pytest.mark.parametrize("name", ["gpt2", "llama2"])
def test_two_backward_calls_accumulate(name):
    model = make(name).eval()
    rng = np.random.default_rng(1)
    logits = model.forward(batch(rng))
    dlogits = rng.standard_normal(logits.shape)
    model.zero_grad()
    d1 = model.backward(dlogits)
    once = grads_copy(model)
    d2 = model.backward(dlogits)
    assert_close(d2, d1, F64, "dtok of the second call")
    assert_grads_close(model.gradients(), {n: 2 * g for n, g in once.items()})


def test_two_different_backward_calls_add():
    model = make("gpt2").eval()
    rng = np.random.default_rng(2)
    logits = model.forward(batch(rng))
    da, db = rng.standard_normal(logits.shape), rng.standard_normal(logits.shape)
    separate = []
    for d in (da, db):
        model.zero_grad()
        model.backward(d)
        separate.append(grads_copy(model))
    model.zero_grad()
    model.backward(da + db)  # the model is linear in dlogits
    summed = grads_copy(model)
    model.zero_grad()
    model.backward(da)
    model.backward(db)
    assert_grads_close(model.gradients(), {n: g + separate[1][n] for n, g in separate[0].items()})
    assert_grads_close(model.gradients(), summed)


@pytest.mark.parametrize("name", ["gpt2", "palm"])
def test_tied_embedding_gradient_is_lookup_plus_head(name):
    tied = make(name, dropout=0.0)
    assert tied.config.tie_embeddings
    untied = DecoderLM(tied.config.replace(tie_embeddings=False, lm_head_bias=False), seed=5)
    rng = np.random.default_rng(3)
    scramble(tied, rng)
    W = tied.parameters()["embed.tokens.weight"]
    for n, p in untied.parameters().items():
        p[...] = W if n == "lm_head.weight" else tied.parameters()[n]
    ids = batch(rng)
    logits = tied.forward(ids)
    assert_close(untied.forward(ids), logits, F64, "same function")
    dlogits = rng.standard_normal(logits.shape)
    tied.zero_grad()
    untied.zero_grad()
    d_tied = tied.backward(dlogits)
    d_untied = untied.backward(dlogits)
    assert_close(d_tied, d_untied, F64, "dtok")
    tg, ug = tied.gradients(), untied.gradients()
    lookup, head = ug["embed.tokens.weight"], ug["lm_head.weight"]
    assert np.any(lookup != 0) and np.any(head != 0)
    assert_close(tg["embed.tokens.weight"], lookup + head, F64, "tied = lookup + head")
    others = lambda grads: {n: g for n, g in grads.items()  # noqa: E731
                            if n not in ("embed.tokens.weight", "lm_head.weight")}
    assert_grads_close(others(tg), others(ug))


# ---- backward misuse ------------------------------------------------------------------------


def test_backward_before_forward_raises():
    model = make()
    with pytest.raises(ValueError, match="forward first"):
        model.backward(np.zeros((1, 3, 11)))


def test_backward_after_a_kv_cached_forward_raises():
    model = make().eval()
    ids = np.array([[1, 2, 3]])
    model.forward(ids)  # a trainable forward ...
    caches = model.new_kv_caches()
    logits = model.forward(ids, kv_caches=caches)  # ... replaced by an inference-only one
    with pytest.raises(ValueError, match="KV-cached|kv_caches"):
        model.backward(np.zeros_like(logits))
    # the pure form refuses too
    logits, cache = model.forward_with_cache(np.array([[4]]), kv_caches=caches)
    with pytest.raises(ValueError, match="KV-cached|kv_cache"):
        model.backward_with_cache(np.zeros_like(logits), cache)


def test_bad_dlogits_raise():
    model = make().eval()
    logits = model.forward(np.array([[1, 2, 3]]))
    for bad, what in [
        (np.zeros((1, 3, 10)), "shape"),
        (np.zeros((3, 11)), "shape"),
        (np.zeros((1, 3, 11), dtype=np.float32), "dtype"),
        (np.zeros((1, 3, 11), dtype=np.int64), "floating"),
        (np.full((1, 3, 11), np.nan), "NaN"),
        ([[0.0] * 11] * 3, "ndarray"),
    ]:
        with pytest.raises(ValueError, match="dlogits") as info:
            model.backward(bad)
        assert what in str(info.value), str(info.value)
    model.backward(np.zeros_like(logits))  # the right one works


# ---- bad inputs ----------------------------------------------------------------------------


def test_bad_ids_raise():
    model = make()
    for bad, what in [
        (np.array([[1, 11]]), "vocab"),  # out of range (V = 11)
        (np.array([[1, -1]]), "vocab"),
        (np.array([[1.0, 2.0]]), "dtype"),  # float ids
        (np.array([1, 2, 3]), "(B, T)"),  # 1-D
        (np.zeros((1, 2, 3), dtype=np.int64), "(B, T)"),
        (np.zeros((1, 0), dtype=np.int64), "(B, T)"),
        ([[1, 2]], "(B, T)"),
    ]:
        with pytest.raises(ValueError, match="ids") as info:
            model.forward(bad)
        assert what in str(info.value), str(info.value)


def test_bad_inputs_embeds_raise():
    model = make()
    good = np.zeros((1, 3, 12))
    bad_values = good.copy()
    bad_values[0, 1, 2] = np.nan
    for bad in [bad_values, np.full((1, 3, 12), np.inf), good[0], np.zeros((1, 3, 5)),
                good.astype(np.float32), good.astype(np.int64)]:
        with pytest.raises(ValueError, match="inputs_embeds"):
            model.forward(inputs_embeds=bad)
    with pytest.raises(ValueError, match="exactly one"):
        model.forward(np.array([[1, 2, 3]]), inputs_embeds=good)
    with pytest.raises(ValueError, match="exactly one"):
        model.forward()


def test_too_long_sequences_raise():
    model = make()  # max_seq_len 16
    model.forward(np.zeros((1, 16), dtype=np.int64))
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model.forward(np.zeros((1, 17), dtype=np.int64))
    # also when the positions come from a KV cache
    caches = model.eval().new_kv_caches()
    model.forward(np.zeros((1, 10), dtype=np.int64), kv_caches=caches)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.forward(np.zeros((1, 7), dtype=np.int64), kv_caches=caches)


def test_bad_doc_ids_raise():
    model = make("llama3")
    ids = np.array([[1, 2, 3, 4]])
    for bad in [np.array([0, 0, 1, 1]), np.array([[0, 0, 1]]), np.zeros((2, 4), dtype=np.int64),
                [[0, 0, 1, 1]]]:
        with pytest.raises(ValueError, match="doc_ids"):
            model.forward(ids, bad)
    model.forward(ids, np.array([[0, 0, 1, 1]]))


def test_wrong_number_of_kv_caches_raises():
    model = make().eval()
    with pytest.raises(ValueError, match="kv_caches"):
        model.forward(np.array([[1]]), kv_caches=model.new_kv_caches()[:1])


# ---- KV-cached decoding -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "gpt3", "gpt-j", "llama2", "llama3"])
@pytest.mark.parametrize("chunks", [(1,) * 11, (4, 1, 3, 2, 1)])
def test_kv_cached_decoding_equals_one_full_forward(name, chunks):
    model = make(name).eval()  # gpt3: window 3 spans chunk boundaries
    rng = np.random.default_rng(4)
    scramble(model, rng)
    T = sum(chunks)
    ids = batch(rng, T=T)
    doc_ids = None
    if model.config.document_mask:
        doc_ids = np.array([[0] * 3 + [1] * 5 + [2] * 3, [0] * 6 + [1] * 5])
    full = model.forward(ids, doc_ids)
    caches = model.new_kv_caches()
    pieces, start = [], 0
    for length in chunks:
        part = slice(start, start + length)
        pieces.append(model.forward(ids[:, part], None if doc_ids is None else doc_ids[:, part],
                                    kv_caches=caches))
        start += length
    assert all(c.length == T for c in caches)
    assert_close(np.concatenate(pieces, axis=1), full, F64, f"{name} cached", rtol=1e-12)
    if doc_ids is not None:  # the mask matters here, so the check above covers it
        assert not np.allclose(model.forward(ids), full)


# ---- inputs_embeds ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "llama2"])
def test_inputs_embeds_equal_the_ids_path(name):
    model = make(name, dropout=0.0)
    rng = np.random.default_rng(5)
    scramble(model, rng)
    ids = batch(rng)
    W = model.parameters()["embed.tokens.weight"]
    dlogits = rng.standard_normal((2, 7, 11))
    logits = model.forward(ids)
    model.zero_grad()
    d_ids = model.backward(dlogits)
    ids_grads = grads_copy(model)
    logits_e = model.forward(inputs_embeds=W[ids].copy())
    assert_close(logits_e, logits, F64, "logits")
    model.zero_grad()
    d_embeds = model.backward(dlogits)
    assert_close(d_embeds, d_ids, F64, "d token vectors")
    embeds_grads = model.gradients()
    assert_grads_close({n: g for n, g in embeds_grads.items() if n != "embed.tokens.weight"},
                       {n: g for n, g in ids_grads.items() if n != "embed.tokens.weight"})
    # no lookup, so the table gets only the head's share (tied) or nothing (untied)
    lookup_share = np.zeros_like(W)
    np.add.at(lookup_share, ids, d_ids)
    assert_close(embeds_grads["embed.tokens.weight"], ids_grads["embed.tokens.weight"] - lookup_share,
                 F64, "table gradient", atol=1e-14)
    if not model.config.tie_embeddings:
        assert np.all(embeds_grads["embed.tokens.weight"] == 0)


# ---- dropout ----------------------------------------------------------------------------------


def test_eval_is_deterministic_and_train_is_not():
    model = make("gpt2", dropout=0.2)
    assert model.training  # like torch, a new model trains
    ids = batch(np.random.default_rng(6))
    a, b = model.forward(ids), model.forward(ids)
    assert not np.allclose(a, b)
    model.eval()
    a, b = model.forward(ids), model.forward(ids)
    np.testing.assert_array_equal(a, b)
    off = make("gpt2", dropout=0.0)  # eval equals a model without dropout
    np.testing.assert_array_equal(off.forward(ids), a)
    model.train()
    assert not np.allclose(model.forward(ids), a)


def test_interleaved_pure_forwards_give_the_grads_of_separate_runs():
    model = make("gpt2", dropout=0.3)
    rng = np.random.default_rng(7)
    scramble(model, rng)
    ids = batch(rng)  # the same ids twice: only the dropout masks differ
    d1, d2 = rng.standard_normal((2, 7, 11)), rng.standard_normal((2, 7, 11))
    state = model.dropout_rng.bit_generator.state

    logits1, cache1 = model.forward_with_cache(ids)
    logits2, cache2 = model.forward_with_cache(ids)
    assert not np.allclose(logits1, logits2)
    model.zero_grad()
    dtok2 = model.backward_with_cache(d2, cache2)
    grads2 = grads_copy(model)
    model.zero_grad()
    dtok1 = model.backward_with_cache(d1, cache1)  # the older cache, used last
    grads1 = grads_copy(model)

    model.dropout_rng.bit_generator.state = state  # replay the same masks, one run at a time
    for logits, dtok, grads, d in ((logits1, dtok1, grads1, d1), (logits2, dtok2, grads2, d2)):
        np.testing.assert_array_equal(model.forward(ids), logits)
        model.zero_grad()
        assert_close(model.backward(d), dtok, F64, "dtok")
        assert_grads_close(model.gradients(), grads)


# ---- dtype --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "gpt-j", "llama3"])
def test_float32_model_stays_float32(name):
    model = make(name, dtype="float32")
    assert all(p.dtype == np.float32 for p in model.parameters().values())
    rng = np.random.default_rng(8)
    ids = batch(rng)
    doc_ids = np.array([[0] * 3 + [1] * 4, [0] * 7]) if model.config.document_mask else None
    logits = model.forward(ids, doc_ids)
    assert logits.dtype == np.float32
    model.zero_grad()
    dtok = model.backward(rng.standard_normal(logits.shape).astype(np.float32))
    assert dtok.dtype == np.float32
    for n, g in model.gradients().items():
        assert g.dtype == np.float32, n
        assert np.all(np.isfinite(g)), n
    with pytest.raises(ValueError, match="dlogits"):
        model.backward(rng.standard_normal(logits.shape))  # float64 into a float32 model
    # and it computes what the float64 model computes
    logits = model.eval().forward(ids, doc_ids)
    logits64 = make(name).eval().forward(ids, doc_ids)
    assert logits.dtype == np.float32
    assert_close(logits, logits64, np.float32, "float32 vs float64 logits")
