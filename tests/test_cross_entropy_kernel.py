"""The fused softmax–cross-entropy kernel (npformer.kernels.cross_entropy) against its
functional twin: cross_entropy_forward(logits, targets) then cross_entropy_backward(1.0, …),
in both dtypes, odd vocabularies, ignored rows, huge logits, in place, bad input, and as
plain Python under NUMBA_DISABLE_JIT=1."""

import numpy as np

from helpers import assert_subset_passes_without_jit
import pytest

from npformer._validate import NonFiniteError
from npformer.functional.cross_entropy import cross_entropy_backward, cross_entropy_forward
from npformer.kernels.cross_entropy import softmax_cross_entropy
from test_cross_entropy import HUGE_LOGITS, HUGE_TARGETS, _float64_cross_entropy_rows

RTOL = {np.float64: 1e-12, np.float32: 1e-5}  # the kernel contract (DESIGN / issue 15)
EXP_FLOOR = {np.float64: np.exp(-708.0), np.float32: np.exp(-87.0)}  # flash_attention's exp
SHAPES = [(3, 65), (1, 65), (1, 1), (4, 1), (3, 1000), (2, 3, 65), (65,)]


def _reference(logits, targets, ignore_index=-100):
    loss, cache = cross_entropy_forward(logits, targets, ignore_index=ignore_index)
    return loss, cross_entropy_backward(1.0, cache)


def _inputs(rng, shape, dtype, offset=0.0, scale=3.0, n_ignored=1, ignore_index=-100):
    logits = (rng.standard_normal(shape) * scale + offset).astype(dtype)
    targets = rng.integers(0, shape[-1], size=shape[:-1])
    if targets.size > 1:  # keep at least one counted row
        flat = targets.reshape(-1)
        flat[rng.choice(flat.size, size=min(n_ignored, flat.size - 1), replace=False)] = (
            ignore_index)
    return logits, targets


def assert_kernel_matches(loss, dlogits, logits, targets, ignore_index=-100):
    """Loss: relative RTOL. dlogits = g (p − onehot), g = 1/N_valid: every non-target entry
    (g p_v) within RTOL of itself, plus g e^floor: the kernel's exp gives exactly 0 below
    its floor (e^-87 ≈ 1.6e-38 in float32, e^-708 in float64, the smallest normal numbers)
    where NumPy's gives a subnormal; the target entry g (p_y − 1) cancels when
    p_y ≈ 1 (for the reference as well), so it is held to RTOL · g."""
    dtype = logits.dtype.type
    rtol = RTOL[dtype]
    ref_loss, ref_dlogits = _reference(logits, targets, ignore_index)
    assert isinstance(loss, np.ndarray) and loss.shape == () and loss.dtype == dtype
    assert abs(float(loss) - float(ref_loss)) <= rtol * abs(float(ref_loss)), (loss, ref_loss)
    assert dlogits.shape == logits.shape and dlogits.dtype == dtype
    vocab = logits.shape[-1]
    valid = targets != ignore_index
    g = 1.0 / max(int(np.count_nonzero(valid)), 1)
    is_target = (np.arange(vocab) == np.where(valid, targets, -1)[..., None])  # (..., V)
    error = np.abs(dlogits.astype(np.float64) - ref_dlogits.astype(np.float64))
    bound = np.where(is_target, rtol * g,
                     rtol * np.abs(ref_dlogits.astype(np.float64)) + g * EXP_FLOOR[dtype])
    worst = np.unravel_index(int(np.argmax(error - bound)), error.shape)
    assert np.all(error <= bound), (worst, dlogits[worst], ref_dlogits[worst])
    assert np.all(dlogits[~valid] == 0)  # an ignored row passes no gradient


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: "x".join(map(str, shape)))
@pytest.mark.parametrize("offset", [0.0, 1e4, -1e4])
def test_matches_the_functional_pair(dtype, shape, offset):
    rng = np.random.default_rng(sum(shape) + abs(int(offset)) + (offset < 0))
    logits, targets = _inputs(rng, shape, dtype, offset=offset)
    before = logits.copy()
    loss, dlogits = softmax_cross_entropy(logits, targets)
    assert np.array_equal(logits, before)  # a separate output leaves the logits alone
    assert_kernel_matches(loss, dlogits, logits, targets)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_several_ignored_rows_and_another_ignore_index(dtype):
    rng = np.random.default_rng(3)
    logits, targets = _inputs(rng, (9, 65), dtype, n_ignored=5, ignore_index=7)
    loss, dlogits = softmax_cross_entropy(logits, targets, ignore_index=7)
    assert_kernel_matches(loss, dlogits, logits, targets, ignore_index=7)
    # class 7 is a real class under the default ignore_index: the same targets mean otherwise
    loss_default, _ = softmax_cross_entropy(logits, targets % 7)
    assert float(loss_default) != float(loss)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_in_place_gradient_overwrites_the_logits_with_the_same_bits(dtype):
    rng = np.random.default_rng(5)
    logits, targets = _inputs(rng, (3, 1000), dtype, n_ignored=1)
    loss_out, dlogits_out = softmax_cross_entropy(logits, targets)
    buffer = logits.copy()
    loss_in, dlogits_in = softmax_cross_entropy(buffer, targets, dlogits_out=buffer)
    assert dlogits_in is buffer  # no new (N, V) array
    assert np.array_equal(dlogits_in, dlogits_out) and float(loss_in) == float(loss_out)
    assert_kernel_matches(loss_in, dlogits_in, logits, targets)
    given = np.full_like(logits, np.nan)
    _, dlogits_given = softmax_cross_entropy(logits, targets, dlogits_out=given)
    assert dlogits_given is given and np.array_equal(given, dlogits_out)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_every_target_ignored_gives_zero_loss_and_gradient(dtype):
    logits = np.random.default_rng(0).standard_normal((3, 65)).astype(dtype)
    out = np.full_like(logits, 5.0)  # stale values must be overwritten with zeros
    loss, dlogits = softmax_cross_entropy(logits, np.full(3, -100), dlogits_out=out)
    ref_loss, ref_dlogits = _reference(logits, np.full(3, -100))
    assert loss.dtype == dtype and float(loss) == 0.0 == float(ref_loss)
    assert np.all(dlogits == 0) and np.all(ref_dlogits == 0)


def test_huge_finite_float32_logits_give_the_true_loss():
    # the overflow cases of test_cross_entropy: x − m beyond float32 inside a row is a class
    # of probability 0, not NaN; reference: the same formula in long double
    targets = np.where(np.arange(4) == 3, -100, HUGE_TARGETS)
    loss, dlogits = softmax_cross_entropy(HUGE_LOGITS.copy(), targets)
    expected = _float64_cross_entropy_rows(HUGE_LOGITS, targets, 0.0).sum() / 3
    assert loss.dtype == np.float32 and np.isfinite(loss)
    assert abs(float(loss) - expected) <= 1e-6 * max(abs(expected), 1e-30) + 1e-7, (loss,
                                                                                    expected)
    assert_kernel_matches(loss, dlogits, HUGE_LOGITS, targets)
    in_place = HUGE_LOGITS.copy()
    softmax_cross_entropy(in_place, targets, dlogits_out=in_place)
    assert np.array_equal(in_place, dlogits)


def test_a_loss_beyond_the_dtype_is_a_clear_error():
    logits = HUGE_LOGITS[:1].copy()  # class 1 has log p = −6e38, beyond float32
    with pytest.raises(NonFiniteError, match=r"softmax_cross_entropy: the loss of 1 counted "
                                             r"row\(s\) \(first at index \(0,\)\) is not "
                                             r"representable in float32"):
        softmax_cross_entropy(logits, np.array([1]))
    with pytest.raises(NonFiniteError):  # the functional pair agrees it is an error
        cross_entropy_forward(logits, np.array([1]))
    loss, dlogits = softmax_cross_entropy(logits, np.array([-100]))  # the same row, ignored
    assert float(loss) == 0.0 and np.all(dlogits == 0)
    # float64 logits near the largest double: x_y − m = −2.2e308 overflows
    huge64 = np.array([[1.2e308, 1.2e308, -1e308]])
    loss, dlogits = softmax_cross_entropy(huge64, np.array([0]))
    assert_kernel_matches(loss, dlogits, huge64, np.array([0]))
    assert abs(float(loss) - np.log(2.0)) <= 1e-15
    with pytest.raises(NonFiniteError, match=r"first at index \(1, 0\)\) is not representable "
                                             r"in float64"):
        softmax_cross_entropy(np.stack([huge64, huge64]), np.array([[0], [2]]))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_logits_give_a_nan_loss_not_a_finite_one(dtype, bad):
    # not checked up front (the model validates once per step), but never a finite loss:
    # the exp maps a NaN argument to probability 0, so a probe carries it into the loss
    logits = np.random.default_rng(1).standard_normal((3, 65)).astype(dtype)
    logits[1, 10] = bad  # not a target
    loss, _ = softmax_cross_entropy(logits, np.array([3, 4, 5]))
    assert np.isnan(loss)


def test_bad_inputs_are_clear_errors():
    logits = np.zeros((2, 5), dtype=np.float32)
    targets = np.array([1, 2])
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 4\].*got out-of-range "
                                         r"value\(s\) \[5\]"):
        softmax_cross_entropy(logits, np.array([1, 5]))
    with pytest.raises(ValueError, match=r"out-of-range value\(s\) \[-1\]"):
        softmax_cross_entropy(logits, np.array([-1, 0]))
    with pytest.raises(ValueError, match="targets must be an integer array"):
        softmax_cross_entropy(logits, np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"targets must have shape \(2,\)"):
        softmax_cross_entropy(logits, np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="ignore_index must be an integer"):
        softmax_cross_entropy(logits, targets, ignore_index=1.5)
    with pytest.raises(ValueError, match="logits must be a float32/float64"):
        softmax_cross_entropy(logits.astype(np.int32), targets)
    with pytest.raises(ValueError, match=r"logits must have shape \(\.\.\., V\) with V >= 1"):
        softmax_cross_entropy(np.zeros((2, 0), dtype=np.float32), targets)
    with pytest.raises(ValueError, match="logits must be C-contiguous"):
        softmax_cross_entropy(np.zeros((5, 2), dtype=np.float32).T, targets)
    with pytest.raises(ValueError, match=r"dlogits_out must be .* shape \(2, 5\) and dtype "
                                         r"float32"):
        softmax_cross_entropy(logits, targets, dlogits_out=np.zeros((2, 5)))
    shared = np.zeros(11, dtype=np.float32)
    with pytest.raises(ValueError, match="dlogits_out overlaps logits"):
        softmax_cross_entropy(shared[:10].reshape(2, 5), targets,
                              dlogits_out=shared[1:].reshape(2, 5))
    read_only = logits.copy()
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        softmax_cross_entropy(read_only, targets, dlogits_out=read_only)


def test_fuzz_against_the_functional_pair():
    """300 seeded cases: dtype, 1–3 leading dims, V in 1…300, logit scale 1e-3…1e3 and
    offsets up to ±1e4, 0–all ignored rows, in place or not."""
    rng = np.random.default_rng(2026)
    cases = 0
    for _ in range(300):
        dtype = [np.float32, np.float64][int(rng.integers(2))]
        lead = tuple(int(n) for n in rng.integers(1, 5, size=int(rng.integers(1, 4))))
        vocab = int(rng.integers(1, 301))
        scale = float(10.0 ** rng.uniform(-3, 3))
        offset = float(rng.choice([0.0, 1e4, -1e4, rng.uniform(-100, 100)]))
        logits, targets = _inputs(rng, lead + (vocab,), dtype, offset=offset, scale=scale,
                                  n_ignored=int(rng.integers(0, 4)))
        if rng.random() < 0.05:
            targets[...] = -100
        work = logits.copy()
        out = work if rng.random() < 0.5 else None
        loss, dlogits = softmax_cross_entropy(work, targets, dlogits_out=out)
        assert_kernel_matches(loss, dlogits, logits, targets)
        cases += 1
    assert cases == 300


# ---- the kernels as plain Python ---------------------------------------------------------

JIT_FREE_SUBSET = ("test_matches_the_functional_pair and float32 or test_in_place or "
                   "test_every_target_ignored or test_huge_finite or test_a_loss_beyond or "
                   "test_non_finite_logits")


def test_kernel_passes_as_plain_python_under_numba_disable_jit():
    """A subset of this file in a child process with NUMBA_DISABLE_JIT=1, where the kernel
    (and flash_attention's exp it calls) run as ordinary Python (prange = range)."""
    assert_subset_passes_without_jit(__file__, JIT_FREE_SUBSET, 33,
                                     "npformer.kernels.cross_entropy:_cross_entropy_rows")
