"""embedding: finite differences, repeated ids, padding_idx, PyTorch parity (F.embedding),
bad input."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, assert_gradcheck_passes, to_torch
from npformer.functional.embedding import embedding_backward, embedding_forward
from npformer.gradcheck import check_pair, run_checks

ID_SHAPES = [(), (5,), (3, 7), (2, 3, 5), (2, 1, 3, 4)]  # shapes of ids: 0-3 leading dims


def _weight(rng, vocab, channels, dtype=np.float64):
    return (rng.standard_normal((vocab, channels)) * 1.3 - 0.2).astype(dtype)


def _ids(rng, shape, vocab):
    # draw from a small range of the vocabulary so ids repeat
    return np.asarray(rng.integers(0, min(vocab, 4), size=shape) * 2 + 1)  # 0-d stays an array


def test_registered_check_passes():
    assert_gradcheck_passes(run_checks(["embedding"]))


@pytest.mark.parametrize("shape", ID_SHAPES)
def test_finite_differences(shape):
    rng = np.random.default_rng(len(shape) + 100)
    inputs = {"ids": _ids(rng, shape, 11), "weight": _weight(rng, 11, 6)}
    assert_gradcheck_passes(
        check_pair("embedding", embedding_forward, embedding_backward, inputs, ("weight",))
    )


def test_repeated_ids_accumulate():
    rng = np.random.default_rng(3)
    weight = _weight(rng, 5, 3)
    ids = np.array([2, 0, 2, 2, 4])
    out, cache = embedding_forward(ids, weight)
    np.testing.assert_array_equal(out, weight[ids])
    dout = rng.standard_normal((5, 3))
    dweight = embedding_backward(dout, cache)
    np.testing.assert_allclose(dweight[2], dout[0] + dout[2] + dout[3], rtol=1e-15)
    np.testing.assert_array_equal(dweight[0], dout[1])
    np.testing.assert_array_equal(dweight[4], dout[4])
    np.testing.assert_array_equal(dweight[[1, 3]], 0)  # tokens that never occur
    # the buffered `dW[ids] += dout` keeps only one of the three contributions to row 2
    buffered = np.zeros_like(weight)
    buffered[ids] += dout
    assert not np.allclose(buffered[2], dweight[2])


@pytest.mark.parametrize("padding_idx", [0, 3, -1, -5])
def test_padding_row_gets_no_gradient(padding_idx):
    rng = np.random.default_rng(4)
    vocab = 6
    weight = _weight(rng, vocab, 4)
    ids = np.array([[0, 3, 5, 3], [1, 5, 0, 3]])  # the padding token occurs, repeated
    out_pad, cache_pad = embedding_forward(ids, weight, padding_idx=padding_idx)
    out, cache = embedding_forward(ids, weight)
    np.testing.assert_array_equal(out_pad, out)  # the forward is unchanged
    dout = rng.standard_normal(out.shape)
    dweight_pad = embedding_backward(dout, cache_pad)
    dweight = embedding_backward(dout, cache)  # checked by finite differences above
    row = padding_idx % vocab
    assert np.any(dweight[row] != 0)  # the token occurs, so without padding_idx it would train
    np.testing.assert_array_equal(dweight_pad[row], 0)
    others = np.arange(vocab) != row
    np.testing.assert_array_equal(dweight_pad[others], dweight[others])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", ID_SHAPES)
@pytest.mark.parametrize("padding_idx", [None, 3, -2])
def test_torch_parity(dtype, shape, padding_idx):
    rng = np.random.default_rng(sum(shape) + 7)
    vocab, channels = 9, 5
    weight = _weight(rng, vocab, channels, dtype)
    ids = _ids(rng, shape, vocab)  # odd ids 1..7, repeated; includes 3 and 7 (= -2 mod 9)
    out, cache = embedding_forward(ids, weight, padding_idx=padding_idx)
    dout = rng.standard_normal(out.shape).astype(dtype)
    dweight = embedding_backward(dout, cache)

    wt = to_torch(weight, True)
    outt = F.embedding(torch.from_numpy(ids.astype(np.int64)), wt, padding_idx=padding_idx)
    outt.backward(to_torch(dout))
    assert out.shape == shape + (channels,)
    assert out.dtype == dtype and dweight.dtype == dtype
    assert_close(out, outt, dtype, "out")
    assert_close(dweight, wt.grad, dtype, "dweight")


@pytest.mark.parametrize("id_dtype", [np.int8, np.uint16, np.int32, np.int64])
def test_any_integer_id_dtype(id_dtype):
    rng = np.random.default_rng(5)
    weight = _weight(rng, 7, 3)
    ids = np.array([[6, 0, 6], [2, 2, 5]], dtype=id_dtype)
    out, cache = embedding_forward(ids, weight)
    np.testing.assert_array_equal(out, weight[ids.astype(np.int64)])
    dout = rng.standard_normal((2, 3, 3))
    np.testing.assert_array_equal(embedding_backward(dout, cache),
                                  embedding_backward(dout, embedding_forward(ids.astype(int),
                                                                             weight)[1]))


def test_two_calls_give_independent_caches():
    # tied embeddings call the lookup more than once: the first cache must survive the second
    rng = np.random.default_rng(6)
    weight = _weight(rng, 6, 4)
    ids1, ids2 = np.array([1, 1, 4]), np.array([0, 5, 5, 2])
    dout1 = rng.standard_normal((3, 4))
    _, cache1 = embedding_forward(ids1, weight)
    expected = embedding_backward(dout1, cache1)
    _, cache2 = embedding_forward(ids2, weight)
    np.testing.assert_array_equal(embedding_backward(dout1, cache1), expected)
    assert embedding_backward(rng.standard_normal((4, 4)), cache2)[1].sum() == 0


def test_out_is_a_copy():
    weight = np.arange(6.0).reshape(3, 2)
    out, _ = embedding_forward(np.array([1]), weight)
    out[0, 0] = 100.0
    assert weight[1, 0] == 2.0


def test_bad_inputs():
    w = np.ones((5, 3))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 4\].*\[5\]"):
        embedding_forward(np.array([0, 5]), w)
    with pytest.raises(ValueError, match=r"ids must lie in .*\[-1\]"):
        embedding_forward(np.array([-1, 2]), w)
    with pytest.raises(ValueError, match="integer array"):
        embedding_forward(np.array([0.0, 1.0]), w)
    with pytest.raises(ValueError, match="integer array"):
        embedding_forward(np.array([True, False]), w)
    with pytest.raises(ValueError, match="numpy.ndarray"):
        embedding_forward([0, 1], w)
    with pytest.raises(ValueError, match="2-D"):
        embedding_forward(np.array([0]), np.ones((5, 3, 1)))
    with pytest.raises(ValueError, match="at least 2 dimension"):
        embedding_forward(np.array([0]), np.ones(5))
    with pytest.raises(ValueError, match="floating-point"):
        embedding_forward(np.array([0]), np.ones((5, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="NaN"):
        embedding_forward(np.array([0]), np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match=r"padding_idx must lie in \[-5, 4\].*got 5"):
        embedding_forward(np.array([0]), w, padding_idx=5)
    with pytest.raises(ValueError, match=r"padding_idx must lie in .*got -6"):
        embedding_forward(np.array([0]), w, padding_idx=-6)
    with pytest.raises(ValueError, match="padding_idx must be None or an integer"):
        embedding_forward(np.array([0]), w, padding_idx=1.0)
    with pytest.raises(ValueError, match="padding_idx must be None or an integer"):
        embedding_forward(np.array([0]), w, padding_idx=True)
    _, cache = embedding_forward(np.array([[0, 1]]), w)
    with pytest.raises(ValueError, match="dout must have shape"):
        embedding_backward(np.ones((2, 3)), cache)
    with pytest.raises(ValueError, match="dtype"):
        embedding_backward(np.ones((1, 2, 3), dtype=np.float32), cache)
    with pytest.raises(ValueError, match="NaN"):
        embedding_backward(np.full((1, 2, 3), np.nan), cache)
