"""attention_mask: against brute-force loops, special cases (wide and unit windows, single-token
documents, bottom-right alignment), bad input."""

import itertools

import numpy as np
import pytest

from npformer.functional.attention_mask import attention_mask


def brute_force(B, T, S, causal, window, doc_ids, key_padding_mask):
    """The definition, one (b, i, j) at a time."""
    allowed = np.zeros((B, 1, T, S), dtype=bool)
    for b in range(B):
        for i in range(T):
            qpos = i + S - T  # the queries are the last T positions
            for j in range(S):
                ok = True
                if causal and j > qpos:
                    ok = False
                if window is not None and not (qpos - window < j):
                    ok = False
                if doc_ids is not None and doc_ids[b, j] != doc_ids[b, qpos]:
                    ok = False
                if key_padding_mask is not None and key_padding_mask[b, j]:
                    ok = False
                allowed[b, 0, i, j] = ok
    return allowed


def _doc_ids(rng, B, S):
    # runs of random lengths (1 to 4) with arbitrary, non-consecutive ids
    ids = np.empty((B, S), dtype=np.int64)
    for b in range(B):
        j, doc = 0, int(rng.integers(0, 50))
        while j < S:
            length = int(rng.integers(1, 5))
            ids[b, j:j + length] = doc
            j += length
            doc += int(rng.integers(1, 7))
    return ids


SIZES = [(1, 1, 1), (2, 3, 5), (2, 5, 5), (3, 4, 9), (1, 7, 7), (2, 1, 6)]


@pytest.mark.parametrize("B, T, S", SIZES)
def test_against_brute_force(B, T, S):
    rng = np.random.default_rng(B * 100 + T * 10 + S)
    docs = _doc_ids(rng, B, S)
    padding = rng.random((B, S)) < 0.3
    for causal, window, use_docs, use_padding in itertools.product(
        [False, True], [None, 1, 2, 4], [False, True], [False, True]
    ):
        if window is not None and not causal:
            continue
        kwargs = dict(causal=causal, window=window, doc_ids=docs if use_docs else None,
                      key_padding_mask=padding if use_padding else None)
        allowed = attention_mask(B, T, S, **kwargs)
        assert allowed.dtype == np.bool_ and allowed.shape == (B, 1, T, S)
        np.testing.assert_array_equal(allowed, brute_force(B, T, S, **kwargs), err_msg=str(kwargs))


@pytest.mark.parametrize("B, T, S", [(2, 6, 4), (1, 3, 3)])
def test_cross_attention_with_padding_only(B, T, S):
    # T > S is fine without causal or doc_ids (cross-attention: no positions involved)
    padding = np.zeros((B, S), dtype=bool)
    padding[0, -1] = True
    allowed = attention_mask(B, T, S, key_padding_mask=padding)
    np.testing.assert_array_equal(allowed, brute_force(B, T, S, False, None, None, padding))
    assert not allowed[0, 0, :, -1].any() and allowed[0, 0, :, :-1].all()
    assert attention_mask(B, T, S).all()  # no mask: everything allowed


@pytest.mark.parametrize("T, S", [(5, 5), (3, 8), (1, 4)])
def test_window_wider_than_sequence_is_plain_causal(T, S):
    causal = attention_mask(2, T, S, causal=True)
    for window in (S, S + 1, S + 10):
        np.testing.assert_array_equal(attention_mask(2, T, S, causal=True, window=window), causal)


@pytest.mark.parametrize("T, S", [(5, 5), (3, 8), (1, 4)])
def test_window_one_attends_only_to_itself(T, S):
    allowed = attention_mask(1, T, S, causal=True, window=1)[0, 0]  # (T, S)
    expected = np.zeros((T, S), dtype=bool)
    expected[np.arange(T), np.arange(T) + S - T] = True  # query i at position i + S − T
    np.testing.assert_array_equal(allowed, expected)


def test_bottom_right_alignment_decoding():
    # one new query over 6 keys (5 cached + itself): it sees every key
    assert attention_mask(1, 1, 6, causal=True).all()
    # 2 new queries: the first cannot see the last key
    allowed = attention_mask(1, 2, 6, causal=True)[0, 0]
    np.testing.assert_array_equal(allowed, [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    # and not top-left: torch.tril of (2, 6) would give [[1, 0, ...], [1, 1, 0, ...]]
    assert not np.array_equal(allowed, np.tril(np.ones((2, 6), dtype=bool)))


@pytest.mark.parametrize("causal", [False, True])
def test_single_token_documents(causal):
    S = 6
    docs = np.array([[3, 1, 4, 15, 9, 2], [0, 0, 0, 1, 2, 2]])  # row 0: every doc one token
    allowed = attention_mask(2, S, S, causal=causal, doc_ids=docs)
    np.testing.assert_array_equal(allowed[0, 0], np.eye(S, dtype=bool))
    # row 1: position 3 is a document of its own
    assert allowed[1, 0, 3].sum() == 1 and allowed[1, 0, 3, 3]
    assert allowed[1, 0, :, 3].sum() == 1
    # suffix queries (T < S) take the ids of the last T positions
    suffix = attention_mask(2, 2, S, causal=causal, doc_ids=docs)
    np.testing.assert_array_equal(suffix, allowed[:, :, S - 2:])


def test_document_mask_without_causal_is_block_diagonal():
    docs = np.array([[5, 5, 2, 2, 2, 8]])
    allowed = attention_mask(1, 6, 6, doc_ids=docs)[0, 0]
    np.testing.assert_array_equal(allowed, allowed.T)
    np.testing.assert_array_equal(allowed, docs[0][:, None] == docs[0][None, :])


def test_fully_padded_row_is_all_false():
    padding = np.zeros((2, 5), dtype=bool)
    padding[1] = True
    allowed = attention_mask(2, 3, 5, key_padding_mask=padding)
    assert allowed[0].all() and not allowed[1].any()


def test_bad_inputs():
    docs = np.zeros((2, 5), dtype=np.int64)
    padding = np.zeros((2, 5), dtype=bool)
    with pytest.raises(ValueError, match=r"window must be an integer >= 1, got 0"):
        attention_mask(2, 5, 5, causal=True, window=0)
    with pytest.raises(ValueError, match="window must be an integer"):
        attention_mask(2, 5, 5, causal=True, window=2.0)
    with pytest.raises(ValueError, match="window=3 needs causal=True"):
        attention_mask(2, 5, 5, window=3)
    with pytest.raises(ValueError, match=r"causal attention needs T <= S.*T=6, S=5"):
        attention_mask(2, 6, 5, causal=True)
    with pytest.raises(ValueError, match="causal must be True or False"):
        attention_mask(2, 5, 5, causal="yes")
    with pytest.raises(ValueError, match=r"doc_ids must have shape \(2, 5\)"):
        attention_mask(2, 5, 5, doc_ids=np.zeros((2, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="doc_ids must be an integer array"):
        attention_mask(2, 5, 5, doc_ids=docs.astype(np.float64))
    with pytest.raises(ValueError, match="doc_ids must be a numpy.ndarray"):
        attention_mask(2, 5, 5, doc_ids=[[0] * 5] * 2)
    with pytest.raises(ValueError, match=r"doc_ids needs T <= S.*T=6, S=5"):
        attention_mask(2, 6, 5, doc_ids=docs)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(2, 5\)"):
        attention_mask(2, 5, 5, key_padding_mask=padding[:, :4])
    with pytest.raises(ValueError, match="key_padding_mask must be a bool.*int64"):
        attention_mask(2, 5, 5, key_padding_mask=padding.astype(np.int64))
    with pytest.raises(ValueError, match=r"batch must be an integer >= 1, got 0"):
        attention_mask(0, 5, 5)
    with pytest.raises(ValueError, match=r"T \(number of queries\) must be an integer >= 1"):
        attention_mask(2, 0, 5)
    with pytest.raises(ValueError, match=r"S \(number of keys\) must be an integer"):
        attention_mask(2, 5, 5.0)
