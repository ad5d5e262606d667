"""The embedding's scatter-add kernel (npformer.kernels.embedding) against its functional twin
(np.add.at): repeated ids sum, the padding row gets nothing, ``add_into`` adds."""

import numpy as np
import pytest

from helpers import assert_close, assert_subset_passes_without_jit
from npformer.functional.embedding import embedding_backward, embedding_forward
from npformer.kernels import embedding as embedding_kernels

TOL = {np.float64: 1e-12, np.float32: 1e-5}


def _case(dtype, shape, vocab, channels, padding_idx=None, seed=0):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((vocab, channels)).astype(dtype)
    ids = rng.integers(0, vocab, shape)
    ids.reshape(-1)[: min(3, ids.size)] = ids.reshape(-1)[0]  # a repeated id, at least
    _, cache = embedding_forward(ids, weight, padding_idx)
    dout = (rng.standard_normal(shape + (channels,)) * 3 + 1e4 * (seed % 2)).astype(dtype)
    return dout, cache


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape, vocab, channels, padding_idx", [
    ((1, 1), 1, 1, None), ((2, 7), 5, 3, None), ((16, 33), 65, 129, 0), ((3,), 11, 17, 4),
    ((2, 3, 5), 4, 8, None)])
@pytest.mark.parametrize("seed", [0, 1])
def test_scatter_add_equals_np_add_at(dtype, shape, vocab, channels, padding_idx, seed):
    dout, cache = _case(dtype, shape, vocab, channels, padding_idx, seed)
    expected = embedding_backward(dout, cache)
    got = embedding_kernels.embedding_backward(dout, cache)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert_close(got, expected, np.dtype(dtype), "dweight", rtol=TOL[dtype], atol=0.0)
    if padding_idx is not None:
        assert not got[padding_idx].any()
    start = np.random.default_rng(9).standard_normal(expected.shape).astype(dtype)
    into = start.copy()
    returned = embedding_kernels.embedding_backward(dout, cache, add_into=into)
    assert returned is into
    wanted = start + expected
    if padding_idx is not None:
        wanted[padding_idx] = start[padding_idx]  # the padding row keeps what it had
    assert_close(into, wanted, np.dtype(dtype), "add_into", rtol=TOL[dtype], atol=TOL[dtype])


def test_mismatched_gradients_are_refused():
    dout, cache = _case(np.float64, (2, 3), 5, 4)
    with pytest.raises(ValueError, match="dout must have shape"):
        embedding_kernels.embedding_backward(dout[:, :2], cache)
    with pytest.raises(ValueError, match="add_into must be a"):
        embedding_kernels.embedding_backward(dout, cache, add_into=np.zeros((5, 3)))


def test_kernel_passes_as_plain_python_under_numba_disable_jit():
    assert_subset_passes_without_jit(__file__, "scatter_add_equals and float32", 10,
                                     "npformer.kernels.embedding:_scatter_add_rows")
