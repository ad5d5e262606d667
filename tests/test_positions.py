"""Absolute positions: the sinusoidal table against the 2017 formula, sinusoidal and learned
positions by finite differences and PyTorch parity (F.embedding + x), bad input."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, assert_gradcheck_passes, to_torch
from npformer.functional.positions import (
    learned_positions_backward,
    learned_positions_forward,
    sinusoidal_backward,
    sinusoidal_forward,
    sinusoidal_table,
)
from npformer.gradcheck import check_pair, run_checks

# shapes of x (..., T, C) with 0-2 axes before T, and the position ids used with them:
# None (0 .. T−1), (T,) shifted as in KV-cache decoding, (B, T) packed documents, (1, T)
CASES = [
    ((5, 6), None),
    ((5, 6), np.array([4, 5, 6, 7, 8])),
    ((3, 5, 6), None),
    ((3, 5, 6), np.array([2, 0, 1, 2, 0])),
    ((2, 5, 4), np.array([[0, 1, 2, 0, 1], [3, 4, 0, 1, 2]])),
    ((2, 5, 4), np.array([[6, 7, 8, 0, 1]])),
    ((2, 3, 5, 4), np.array([[0, 1, 0, 1, 2], [5, 0, 1, 2, 3]])),
    ((1, 2, 3, 7, 2), np.array([[1, 0, 3, 2, 4, 6, 5]])),
]
CASE_IDS = [f"{shape}-{'none' if p is None else p.shape}" for shape, p in CASES]


def _x(rng, shape, dtype=np.float64):
    return (rng.standard_normal(shape) * 1.7 - 0.4).astype(dtype)


def _torch_positions(position_ids, x_shape):
    """position ids as torch indices shaped to broadcast against x's (..., T)."""
    T = x_shape[-2]
    if position_ids is None:
        return torch.arange(T)
    pid = torch.from_numpy(position_ids)
    if pid.ndim == 2:  # (B, T) → (B, 1, ..., 1, T): one row of positions per batch element
        pid = pid.reshape((pid.shape[0],) + (1,) * (len(x_shape) - 3) + (T,))
    return pid


def _paper_table_torch(num_positions, dim, base=10000.0):
    """§3.5 of "Attention Is All You Need" written out in torch float64, entry by formula:
    PE(pos, 2i) = sin(pos / base^(2i/d_model)), PE(pos, 2i+1) = cos(pos / base^(2i/d_model))."""
    pos = torch.arange(num_positions, dtype=torch.float64)[:, None]  # (P, 1)
    two_i = torch.arange(0, dim, 2, dtype=torch.float64)[None, :]  # (1, C/2)
    denom = torch.pow(torch.tensor(base, dtype=torch.float64), two_i / dim)
    table = torch.zeros(num_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos / denom)
    table[:, 1::2] = torch.cos(pos / denom)
    return table


# --------------------------------------------------------------------------------------
# registered checks and finite differences
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sinusoidal", "learned_positions"])
def test_registered_check_passes(name):
    assert_gradcheck_passes(run_checks([name]))


@pytest.mark.parametrize("shape, position_ids", CASES, ids=CASE_IDS)
def test_sinusoidal_finite_differences(shape, position_ids):
    rng = np.random.default_rng(sum(shape))
    inputs = {"x": _x(rng, shape), "position_ids": position_ids, "base": 10000.0}
    assert_gradcheck_passes(
        check_pair("sinusoidal", sinusoidal_forward, sinusoidal_backward, inputs, ("x",))
    )


@pytest.mark.parametrize("shape, position_ids", CASES, ids=CASE_IDS)
def test_learned_positions_finite_differences(shape, position_ids):
    rng = np.random.default_rng(sum(shape) + 1)
    inputs = {
        "x": _x(rng, shape),
        "table": rng.standard_normal((9, shape[-1])) * 0.8 + 0.3,
        "position_ids": position_ids,
    }
    assert_gradcheck_passes(check_pair("learned_positions", learned_positions_forward,
                                       learned_positions_backward, inputs, ("x", "table")))


# --------------------------------------------------------------------------------------
# the sinusoidal table
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_positions, dim, base", [(50, 16, 10000.0), (7, 2, 10000.0),
                                                      (33, 10, 500.0)])
def test_sinusoidal_table_matches_paper_formula(num_positions, dim, base):
    table = sinusoidal_table(num_positions, dim, base)
    assert table.dtype == np.float64 and table.shape == (num_positions, dim)
    assert_close(table, _paper_table_torch(num_positions, dim, base), np.float64, "PE")
    table32 = sinusoidal_table(num_positions, dim, base, dtype=np.float32)
    assert table32.dtype == np.float32
    np.testing.assert_array_equal(table32, table.astype(np.float32))  # float64, then cast
    # spot values: PE[pos, 0] = sin(pos), PE[pos, 1] = cos(pos) (frequency base^0 = 1)
    pos = num_positions - 1
    assert table[pos, 0] == pytest.approx(math.sin(pos), abs=1e-15)
    assert table[pos, 1] == pytest.approx(math.cos(pos), abs=1e-15)


def test_sinusoidal_relative_offset_is_a_fixed_linear_map():
    """PE[p + k] = M_k PE[p] with M_k block-diagonal 2 × 2 rotations that do not depend on p."""
    dim, k = 8, 5
    table = sinusoidal_table(40, dim)
    omega = 10000.0 ** (-np.arange(0, dim, 2) / dim)
    m = np.zeros((dim, dim))
    for i, w in enumerate(omega):
        c, s = math.cos(k * w), math.sin(k * w)
        m[2 * i: 2 * i + 2, 2 * i: 2 * i + 2] = [[c, s], [-s, c]]
    np.testing.assert_allclose(table[:-k] @ m.T, table[k:], atol=1e-13)  # p = 0 .. 34
    # shifted by k, not the identity map
    assert np.max(np.abs(table[k:] - table[:-k])) > 0.1


# --------------------------------------------------------------------------------------
# PyTorch parity
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape, position_ids", CASES, ids=CASE_IDS)
def test_sinusoidal_torch_parity(dtype, shape, position_ids):
    rng = np.random.default_rng(sum(shape) + 2)
    x = _x(rng, shape, dtype)
    y, cache = sinusoidal_forward(x, position_ids)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = sinusoidal_backward(dy, cache)

    table_t = _paper_table_torch(20, shape[-1]).to(torch.from_numpy(x).dtype)  # (P, C)
    xt = to_torch(x, True)
    yt = xt + table_t[_torch_positions(position_ids, shape)]
    yt.backward(to_torch(dy))
    assert y.dtype == dtype and dx.dtype == dtype
    assert_close(y, yt, dtype, "y")
    assert_close(dx, xt.grad, dtype, "dx")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape, position_ids", CASES, ids=CASE_IDS)
def test_learned_positions_torch_parity(dtype, shape, position_ids):
    rng = np.random.default_rng(sum(shape) + 3)
    x = _x(rng, shape, dtype)
    table = (rng.standard_normal((11, shape[-1])) * 1.1 + 0.2).astype(dtype)
    y, cache = learned_positions_forward(x, table, position_ids)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx, dtable = learned_positions_backward(dy, cache)

    xt, tt = to_torch(x, True), to_torch(table, True)
    yt = xt + F.embedding(_torch_positions(position_ids, shape), tt)  # GPT-2: wte(ids) + wpe(pos)
    yt.backward(to_torch(dy))
    assert y.dtype == dtype and dx.dtype == dtype and dtable.dtype == dtype
    assert_close(y, yt, dtype, "y")
    assert_close(dx, xt.grad, dtype, "dx")
    assert_close(dtable, tt.grad, dtype, "dtable")


def test_learned_positions_scatter_adds_repeats_and_batch():
    rng = np.random.default_rng(5)
    x = _x(rng, (2, 4, 3))
    table = rng.standard_normal((6, 3))
    position_ids = np.array([[0, 1, 0, 0], [2, 0, 1, 2]])
    _, cache = learned_positions_forward(x, table, position_ids)
    dy = rng.standard_normal(x.shape)
    _, dtable = learned_positions_backward(dy, cache)
    np.testing.assert_allclose(dtable[0], dy[0, 0] + dy[0, 2] + dy[0, 3] + dy[1, 1], rtol=1e-14)
    np.testing.assert_allclose(dtable[1], dy[0, 1] + dy[1, 2], rtol=1e-14)
    np.testing.assert_allclose(dtable[2], dy[1, 0] + dy[1, 3], rtol=1e-14)
    np.testing.assert_array_equal(dtable[3:], 0)  # positions that never occur


def test_caches_are_independent():
    rng = np.random.default_rng(6)
    x = _x(rng, (2, 3, 4))
    table = rng.standard_normal((5, 4))
    _, cache1 = learned_positions_forward(x, table, np.array([0, 1, 2]))
    _, cache2 = learned_positions_forward(x, table, np.array([4, 3, 3]))
    dy = rng.standard_normal(x.shape)
    _, dtable1 = learned_positions_backward(dy, cache1)
    np.testing.assert_allclose(dtable1[:3], dy.sum(axis=0), rtol=1e-14)  # the first call's ids
    np.testing.assert_array_equal(dtable1[3:], 0)


def test_large_inputs_and_positions_float32():
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((2, 6, 8)) * 1e4).astype(np.float32)
    position_ids = np.array([0, 1, 2, 1000, 50000, 123456])
    y, _ = sinusoidal_forward(x, position_ids)
    assert y.dtype == np.float32 and np.all(np.isfinite(y))
    table = sinusoidal_table(123457, 8)  # float64
    assert_close(y, x.astype(np.float64) + table[position_ids], np.float32, "y")
    # the table is computed in float64 and rounded once: exact float32 entries even where a
    # float32 product pos·ω_i would be off by ~1e-3 radians
    pe, _ = sinusoidal_forward(np.zeros((6, 8), dtype=np.float32), position_ids)
    np.testing.assert_array_equal(pe, table[position_ids].astype(np.float32))


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------


def test_bad_inputs_sinusoidal():
    x = np.ones((2, 3, 4))
    with pytest.raises(ValueError, match=r"C must be even.*got C = 5"):
        sinusoidal_forward(np.ones((2, 3, 5)))
    with pytest.raises(ValueError, match=r"dim must be even"):
        sinusoidal_table(10, 7)
    with pytest.raises(ValueError, match=r"num_positions must be an integer >= 1"):
        sinusoidal_table(0, 4)
    with pytest.raises(ValueError, match=r"dtype must be float32 or float64"):
        sinusoidal_table(3, 4, dtype=np.int32)
    with pytest.raises(ValueError, match=r"base must be a finite number > 0"):
        sinusoidal_forward(x, base=0.0)
    with pytest.raises(ValueError, match="floating-point"):
        sinusoidal_forward(np.ones((3, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="NaN"):
        sinusoidal_forward(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="at least 2 dimension"):
        sinusoidal_forward(np.ones(4))
    _, cache = sinusoidal_forward(x)
    with pytest.raises(ValueError, match="dy must have shape"):
        sinusoidal_backward(np.ones((2, 3, 2)), cache)
    with pytest.raises(ValueError, match="dtype"):
        sinusoidal_backward(np.ones((2, 3, 4), dtype=np.float32), cache)


@pytest.mark.parametrize("forward", ["sinusoidal", "learned"])
def test_bad_position_ids(forward):
    x = np.ones((2, 3, 4))
    table = np.ones((8, 4))

    def call(position_ids):
        if forward == "sinusoidal":
            return sinusoidal_forward(x, position_ids)
        return learned_positions_forward(x, table, position_ids)

    shape_msg = (r"position_ids must have shape \(T,\) with T = x.shape\[-2\] = 3 "
                 r"or \(B, T\) with B = x.shape\[0\] = 2")
    with pytest.raises(ValueError, match=shape_msg + r".*got shape \(4,\)"):
        call(np.arange(4))
    with pytest.raises(ValueError, match=r"position_ids must have shape.*got shape \(3, 3\)"):
        call(np.zeros((3, 3), dtype=np.int64))  # B = 3 but x has 2 rows
    with pytest.raises(ValueError, match=r"position_ids must have shape.*got shape \(2, 1, 3\)"):
        call(np.zeros((2, 1, 3), dtype=np.int64))
    with pytest.raises(ValueError, match=r"position_ids must be >= 0.*\[-1\]"):
        call(np.array([0, -1, 2]))
    with pytest.raises(ValueError, match="position_ids must be an integer array"):
        call(np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="position_ids must be a numpy.ndarray"):
        call([0, 1, 2])
    with pytest.raises(ValueError, match=r"need x with a batch axis"):
        if forward == "sinusoidal":
            sinusoidal_forward(np.ones((3, 4)), np.zeros((1, 3), dtype=np.int64))
        else:
            learned_positions_forward(np.ones((3, 4)), table, np.zeros((1, 3), dtype=np.int64))


def test_bad_inputs_learned_positions():
    x = np.ones((2, 3, 4))
    table = np.ones((5, 4))
    with pytest.raises(ValueError, match=r"position_ids must lie in \[0, 4\] \(the table has "
                                         r"P = 5 positions.*\[5, 7\]"):
        learned_positions_forward(x, table, np.array([1, 5, 7]))
    with pytest.raises(ValueError, match=r"T = 6 positions.*only 5 are available.*P = 5"):
        learned_positions_forward(np.ones((2, 6, 4)), table)
    with pytest.raises(ValueError, match=r"table has C = 3 channels"):
        learned_positions_forward(x, np.ones((5, 3)))
    with pytest.raises(ValueError, match="table must be 2-D"):
        learned_positions_forward(x, np.ones((5, 4, 1)))
    with pytest.raises(ValueError, match="share one dtype"):
        learned_positions_forward(x, table.astype(np.float32))
    bad_table = table.copy()
    bad_table[2, 1] = np.nan
    with pytest.raises(ValueError, match="table contains 1 NaN"):
        learned_positions_forward(x, bad_table)
    _, cache = learned_positions_forward(x, table)
    with pytest.raises(ValueError, match="dy must have shape"):
        learned_positions_backward(np.ones((2, 3)), cache)
    with pytest.raises(ValueError, match="dtype"):
        learned_positions_backward(np.ones((2, 3, 4), dtype=np.float32), cache)
