"""RoPE: finite differences (both layouts, partial rotary), Hugging Face's own rotary code
(Llama, GPT-J, GPT-NeoX) for outputs and input gradients, the relative-position property,
theta, bad input."""

import math

import numpy as np
import pytest
import torch
from transformers import GPTJConfig, GPTNeoXConfig, LlamaConfig
from transformers.models.gpt_neox import modeling_gpt_neox as hf_neox
from transformers.models.gptj import modeling_gptj as hf_gptj
from transformers.models.llama import modeling_llama as hf_llama

from helpers import assert_close, assert_gradcheck_passes, to_torch
from npformer.functional.rope import rope_angles, rope_backward, rope_forward
from npformer.gradcheck import check_pair, run_checks

# (B=2, T=6) positions as in packed documents (each restarts at 0), not arange(T)
PACKED = np.array([[0, 1, 2, 3, 0, 1], [5, 6, 7, 0, 1, 2]])


def _x(rng, shape, dtype=np.float64):
    return (rng.standard_normal(shape) * 1.6 - 0.35).astype(dtype)


# --------------------------------------------------------------------------------------
# registered checks and finite differences
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["rope_half", "rope_interleaved", "rope_partial"])
def test_registered_check_passes(name):
    assert_gradcheck_passes(run_checks([name]))


# shapes of x (..., T, D) with 0-3 axes before T, and the position ids used with them
FD_CASES = [
    ((5, 4), None),
    ((5, 6), np.array([9, 3, 0, 4, 4])),
    ((2, 6, 8), PACKED),
    ((2, 3, 6, 10), PACKED),
    ((1, 2, 3, 6, 6), np.array([[2, 3, 4, 0, 1, 2]])),
]


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("partial", [False, True])
@pytest.mark.parametrize("shape, position_ids", FD_CASES,
                         ids=[f"{s}-{'none' if p is None else p.shape}" for s, p in FD_CASES])
def test_finite_differences(shape, position_ids, layout, partial):
    rng = np.random.default_rng(sum(shape) + 3 * partial)
    rotary_dim = shape[-1] - 2 if partial else None  # partial: the last two channels pass
    inputs = {"x": _x(rng, shape), "position_ids": position_ids, "theta": 10000.0,
              "rotary_dim": rotary_dim, "layout": layout}
    assert_gradcheck_passes(check_pair("rope", rope_forward, rope_backward, inputs, ("x",)))


# --------------------------------------------------------------------------------------
# Hugging Face references
# --------------------------------------------------------------------------------------
# Hugging Face builds its angle tables in float32 whatever the model dtype: inv_freq is
# ``torch.arange(0, dim, 2, dtype=torch.float)`` based, and LlamaRotaryEmbedding.forward /
# GPTNeoXRotaryEmbedding.forward compute ``position_ids.float() * inv_freq.float()`` before
# casting cos/sin to x's dtype; GPT-J's create_sinusoidal_positions returns float32 too. A stock
# float64 run is therefore only good to ~1e-7. To hold float64 parity to 1e-10 the float64
# tests build the SAME formulas in float64 (the two helpers below, written from HF's source)
# and feed them to HF's apply_rotary_pos_emb, which tests HF's rotation and layout code as is.
# test_angle_tables_match_hf checks that these helpers, and ours, equal HF's float32 tables.
# The float32 tests run HF's stock code end to end.


def _half_tables_float64(position_ids_t, dim, theta):
    """LlamaRotaryEmbedding / GPTNeoXRotaryEmbedding (default rope type) in float64:
    cos, sin (B, T, dim) = cos/sin of cat(freqs, freqs), freqs = pos · inv_freq."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    freqs = position_ids_t[..., None].to(torch.float64) * inv_freq  # (B, T, dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, dim): the half layout
    return emb.cos(), emb.sin()


def _gptj_table_float64(num_pos, dim):
    """gptj.create_sinusoidal_positions in float64: (P, dim) = [sin | cos] (theta fixed 10000)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    sinusoid_inp = torch.arange(num_pos, dtype=torch.float64)[:, None] * inv_freq
    return torch.cat((torch.sin(sinusoid_inp), torch.cos(sinusoid_inp)), dim=1)


def _positions(kind, batch, T):
    if kind == "packed":
        return PACKED[:batch, :T]
    return np.broadcast_to(np.arange(T) + 3, (batch, T)).copy()  # shifted, as in decoding


def _ours(x, position_ids, dy, **kwargs):
    y, cache = rope_forward(x, position_ids, **kwargs)
    dx = rope_backward(dy, cache)
    assert y.dtype == x.dtype and dx.dtype == x.dtype
    return y, dx


def _compare(dtype, x, y, dx, yt, xt, what):
    assert_close(y, yt, dtype, f"{what} y")
    assert_close(dx, xt.grad, dtype, f"{what} dx")


LLAMA_CASES = [  # (B, H, K, T, D, positions)
    (2, 4, 2, 6, 8, "packed"),
    (1, 3, 1, 5, 12, "shifted"),
    (2, 2, 2, 6, 6, "shifted"),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("theta", [10000.0, 500000.0])  # Llama 1/2, Llama 3
@pytest.mark.parametrize("case", LLAMA_CASES, ids=[str(c) for c in LLAMA_CASES])
def test_llama_parity(dtype, theta, case):
    batch, n_heads, n_kv, T, D, kind = case
    rng = np.random.default_rng(D + T + n_heads)
    q, k = _x(rng, (batch, n_heads, T, D), dtype), _x(rng, (batch, n_kv, T, D), dtype)
    dq, dk = _x(rng, q.shape, dtype), _x(rng, k.shape, dtype)
    position_ids = _positions(kind, batch, T)
    yq, dxq = _ours(q, position_ids, dq, theta=theta, layout="half")
    yk, dxk = _ours(k, position_ids, dk, theta=theta, layout="half")

    config = LlamaConfig(hidden_size=n_heads * D, num_attention_heads=n_heads,
                         num_key_value_heads=n_kv, head_dim=D,
                         rope_parameters={"rope_type": "default", "rope_theta": theta})
    qt, kt = to_torch(q, True), to_torch(k, True)
    pid_t = torch.from_numpy(position_ids)
    if dtype == np.float32:
        cos, sin = hf_llama.LlamaRotaryEmbedding(config)(qt, pid_t)  # stock, (B, T, D)
    else:  # float64 tables (see the comment above _half_tables_float64)
        cos, sin = _half_tables_float64(pid_t, config.head_dim,
                                        config.rope_parameters["rope_theta"])
    yqt, ykt = hf_llama.apply_rotary_pos_emb(qt, kt, cos, sin)  # unsqueeze_dim=1: over heads
    ((yqt * to_torch(dq)).sum() + (ykt * to_torch(dk)).sum()).backward()
    _compare(dtype, q, yq, dxq, yqt, qt, "q")
    _compare(dtype, k, yk, dxk, ykt, kt, "k")


GPTJ_CASES = [  # (B, H, T, D, rotary_dim): GPT-J itself rotates 64 of 256 channels
    (2, 3, 6, 10, 6),
    (1, 2, 5, 16, 4),
    (2, 2, 6, 8, 8),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", GPTJ_CASES, ids=[str(c) for c in GPTJ_CASES])
def test_gptj_parity(dtype, case):
    batch, n_heads, T, D, rotary_dim = case
    rng = np.random.default_rng(D + T + rotary_dim)
    x = _x(rng, (batch, n_heads, T, D), dtype)
    dy = _x(rng, x.shape, dtype)
    position_ids = _positions("packed", batch, T)
    y, dx = _ours(x, position_ids, dy, rotary_dim=rotary_dim, layout="interleaved")

    config = GPTJConfig(n_embd=n_heads * D, n_head=n_heads, rotary_dim=rotary_dim, n_positions=32)
    xt = to_torch(x, True)
    pid_t = torch.from_numpy(position_ids)
    if dtype == np.float32:
        sin, cos = hf_gptj.GPTJRotaryEmbedding(config)(xt, pid_t)  # stock, (B, T, rd/2) each
    else:  # the float64 table, split as GPTJRotaryEmbedding.forward does
        sincos = _gptj_table_float64(config.max_position_embeddings, config.rotary_dim)[pid_t]
        sin, cos = torch.split(sincos, sincos.shape[-1] // 2, dim=-1)
    # as in GPTJAttention.forward: heads are still axis 2, (B, T, H, D), and only the first
    # rotary_dim channels are rotated (rotate_every_two: interleaved pairs)
    query = xt.transpose(1, 2)
    q_rot = hf_gptj.apply_rotary_pos_emb(query[:, :, :, :rotary_dim], sin, cos)
    yt = torch.cat([q_rot, query[:, :, :, rotary_dim:]], dim=-1).transpose(1, 2)
    yt.backward(to_torch(dy))
    _compare(dtype, x, y, dx, yt, xt, "gptj")


NEOX_CASES = [  # (B, H, T, D, rotary_pct): GPT-NeoX-20B and Pythia use 0.25
    (2, 3, 6, 10, 0.6),
    (2, 2, 6, 16, 0.25),
    (1, 2, 5, 8, 1.0),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("theta", [10000.0, 500000.0])
@pytest.mark.parametrize("case", NEOX_CASES, ids=[str(c) for c in NEOX_CASES])
def test_gpt_neox_parity(dtype, theta, case):
    batch, n_heads, T, D, pct = case
    rng = np.random.default_rng(D + T + int(100 * pct))
    q, k = _x(rng, (batch, n_heads, T, D), dtype), _x(rng, (batch, n_heads, T, D), dtype)
    dq, dk = _x(rng, q.shape, dtype), _x(rng, k.shape, dtype)
    position_ids = _positions("packed", batch, T)

    config = GPTNeoXConfig(hidden_size=n_heads * D, num_attention_heads=n_heads,
                           rotary_pct=pct, rotary_emb_base=theta, max_position_embeddings=32)
    # HF: rotary_ndims = int(head_size * partial_rotary_factor); rotated channels [:rotary_ndims]
    rotary_dim = int(D * config.rope_parameters["partial_rotary_factor"])
    yq, dxq = _ours(q, position_ids, dq, theta=theta, rotary_dim=rotary_dim, layout="half")
    yk, dxk = _ours(k, position_ids, dk, theta=theta, rotary_dim=rotary_dim, layout="half")

    qt, kt = to_torch(q, True), to_torch(k, True)
    pid_t = torch.from_numpy(position_ids)
    if dtype == np.float32:
        cos, sin = hf_neox.GPTNeoXRotaryEmbedding(config)(qt, pid_t)  # stock, (B, T, rd)
    else:  # float64 tables (see the comment above _half_tables_float64)
        cos, sin = _half_tables_float64(pid_t, rotary_dim, theta)
    assert cos.shape[-1] == rotary_dim  # HF's apply slices q[..., :cos.shape[-1]]
    yqt, ykt = hf_neox.apply_rotary_pos_emb(qt, kt, cos, sin)
    ((yqt * to_torch(dq)).sum() + (ykt * to_torch(dk)).sum()).backward()
    _compare(dtype, q, yq, dxq, yqt, qt, "q")
    _compare(dtype, k, yk, dxk, ykt, kt, "k")


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_angle_tables_match_hf(theta):
    """Our cos/sin, and the float64 reference helpers, equal HF's stock float32 tables."""
    position_ids = np.array([[0, 1, 2, 30, 31, 7], [5, 6, 0, 1, 2, 3]])
    pid_t = torch.from_numpy(position_ids)
    x32 = torch.zeros(1, dtype=torch.float32)  # only its dtype is used
    D, rotary_dim = 12, 6

    llama = hf_llama.LlamaRotaryEmbedding(LlamaConfig(
        hidden_size=2 * D, num_attention_heads=2, head_dim=D,
        rope_parameters={"rope_type": "default", "rope_theta": theta}))
    neox = hf_neox.GPTNeoXRotaryEmbedding(GPTNeoXConfig(
        hidden_size=2 * D, num_attention_heads=2, rotary_pct=rotary_dim / D,
        rotary_emb_base=theta))
    for hf_rotary, dim in ((llama, D), (neox, rotary_dim)):
        cos_hf, sin_hf = hf_rotary(x32, pid_t)  # (B, T, dim), cat(half, half)
        cos, sin = rope_angles(position_ids, dim, theta, dtype=np.float32)  # (B, T, dim/2)
        assert cos.dtype == np.float32 and cos.shape == (2, 6, dim // 2)
        for half in (slice(0, dim // 2), slice(dim // 2, dim)):
            assert_close(cos, cos_hf[..., half], np.float32, "cos")
            assert_close(sin, sin_hf[..., half], np.float32, "sin")
        cos64, sin64 = _half_tables_float64(pid_t, dim, theta)
        assert_close(cos64, cos_hf, np.float32, "float64 reference cos")
        assert_close(sin64, sin_hf, np.float32, "float64 reference sin")

    if theta == 10000.0:  # GPT-J's table has no theta
        table_hf = hf_gptj.create_sinusoidal_positions(32, rotary_dim)  # (P, rd) [sin | cos]
        cos, sin = rope_angles(np.arange(32), rotary_dim, dtype=np.float32)
        assert_close(np.concatenate([sin, cos], axis=1), table_hf, np.float32, "gptj table")
        assert_close(_gptj_table_float64(32, rotary_dim), table_hf, np.float32, "float64 gptj")


# --------------------------------------------------------------------------------------
# properties
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("rotary_dim", [None, 6])
@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_scores_depend_only_on_offset(layout, rotary_dim, theta):
    """⟨rope(q, m), rope(k, n)⟩ is a function of m − n alone (Toeplitz score matrix)."""
    rng = np.random.default_rng(17)
    D, N = 10, 40
    q, k = _x(rng, (D,)), _x(rng, (D,))

    def scores(shift):
        positions = np.arange(N) + shift
        qm, _ = rope_forward(np.tile(q, (N, 1)), positions, theta=theta, rotary_dim=rotary_dim,
                             layout=layout)  # (N, D): q at positions shift .. shift + N − 1
        kn, _ = rope_forward(np.tile(k, (N, 1)), positions, theta=theta, rotary_dim=rotary_dim,
                             layout=layout)
        return qm @ kn.T  # s[m, n] = ⟨rope(q, m), rope(k, n)⟩    (N, N)

    s = scores(0)
    scale = np.max(np.abs(s))
    assert np.max(np.abs(s[1:, 1:] - s[:-1, :-1])) <= 1e-12 * scale  # s[m+1, n+1] = s[m, n]
    assert np.max(np.abs(scores(1000) - s)) <= 1e-12 * scale  # and at a far absolute shift
    # m = n gives the unrotated product; other offsets do change the score
    np.testing.assert_allclose(np.diag(s), q @ k, rtol=1e-12)
    assert np.ptp(s[0]) > 0.1 * scale


def test_theta_500000_differs_from_10000():
    rng = np.random.default_rng(8)
    x = _x(rng, (2, 2, 6, 8))
    y_small, _ = rope_forward(x, PACKED, theta=10000.0)
    y_large, _ = rope_forward(x, PACKED, theta=500000.0)
    assert np.all(np.isfinite(y_large))
    # pair 0 has θ_0 = theta^0 = 1 in both; every other pair turns more slowly with 500000
    pair0 = [0, 4]
    np.testing.assert_array_equal(y_small[..., pair0], y_large[..., pair0])
    moved = PACKED > 0  # position 0 is not rotated at all
    diff = np.abs(y_small - y_large)[:, :, :, [1, 2, 3, 5, 6, 7]]
    assert np.min(diff.max(axis=(1, 3))[moved]) > 1e-4  # per (batch, position)
    cos, _ = rope_angles(np.array([1]), 8, theta=500000.0)
    np.testing.assert_allclose(cos[0], np.cos(500000.0 ** (-np.arange(0, 8, 2) / 8)), rtol=1e-15)


@pytest.mark.parametrize("layout, a, b", [("half", 1, 3), ("interleaved", 2, 3)])
def test_layouts_pair_the_right_channels(layout, a, b):
    """rotary_dim = 4 of D = 6: pair 1 is (1, 3) in "half", (2, 3) in "interleaved"; a unit
    vector on its first channel turns by 7·θ_1 into its partner, θ_1 = 10000^(−2/4)."""
    x = np.zeros((1, 6))
    x[0, a] = 1.0
    y, _ = rope_forward(x, np.array([7]), theta=10000.0, rotary_dim=4, layout=layout)
    angle = 7 * 10000.0 ** (-2 / 4)
    expected = np.zeros(6)
    expected[a], expected[b] = math.cos(angle), math.sin(angle)  # a' = a cos, b' = a sin
    np.testing.assert_allclose(y[0], expected, rtol=0, atol=1e-16)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rotation_is_orthogonal(layout):
    """The backward is the inverse rotation: backward(forward(x)) = x; norms are preserved."""
    rng = np.random.default_rng(9)
    x = _x(rng, (2, 3, 6, 10))
    y, cache = rope_forward(x, PACKED, rotary_dim=8, layout=layout)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1),
                               rtol=1e-14)
    np.testing.assert_array_equal(y[..., 8:], x[..., 8:])  # pass-through channels
    np.testing.assert_allclose(rope_backward(y, cache), x, rtol=0, atol=1e-14)


def test_large_inputs_and_positions_float32():
    rng = np.random.default_rng(10)
    x = (rng.standard_normal((2, 2, 6, 8)) * 1e4).astype(np.float32)
    position_ids = np.array([0, 1, 17, 4096, 100000, 131071])
    y, cache = rope_forward(x, position_ids, theta=500000.0)
    y64, _ = rope_forward(x.astype(np.float64), position_ids, theta=500000.0)
    assert y.dtype == np.float32 and np.all(np.isfinite(y))
    assert_close(y, y64, np.float32, "y")
    # the angles are computed in float64 and only cos/sin are rounded to float32 (a float32
    # product pos·θ_i would be off by up to ~1e-3 radians at these positions)
    cos32, sin32 = rope_angles(position_ids, 8, theta=500000.0, dtype=np.float32)
    cos64, sin64 = rope_angles(position_ids, 8, theta=500000.0)
    np.testing.assert_array_equal(cos32, cos64.astype(np.float32))
    np.testing.assert_array_equal(sin32, sin64.astype(np.float32))
    dx = rope_backward(y, cache)
    assert dx.dtype == np.float32
    assert_close(dx, x, np.float32, "inverse")


def test_caches_are_independent():
    rng = np.random.default_rng(11)
    x = _x(rng, (2, 6, 4))
    y1, cache1 = rope_forward(x, PACKED)
    y2, cache2 = rope_forward(x, np.arange(6) + 50, layout="interleaved")
    assert np.max(np.abs(y1 - y2)) > 0.1
    # each backward undoes its own forward's rotation, whatever was called in between
    np.testing.assert_allclose(rope_backward(y1, cache1), x, rtol=0, atol=1e-14)
    np.testing.assert_allclose(rope_backward(y2, cache2), x, rtol=0, atol=1e-14)


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------


def test_bad_rotary_dim_and_layout():
    x = np.ones((2, 3, 5, 10))
    range_msg = r"rotary_dim must be an even integer with 1 <= rotary_dim <= 10"
    with pytest.raises(ValueError, match=range_msg + r".*got 7"):
        rope_forward(x, rotary_dim=7)
    with pytest.raises(ValueError, match=range_msg + r".*got 12"):
        rope_forward(x, rotary_dim=12)
    with pytest.raises(ValueError, match=range_msg + r".*got 0"):
        rope_forward(x, rotary_dim=0)
    with pytest.raises(ValueError, match=range_msg + r".*got -2"):
        rope_forward(x, rotary_dim=-2)
    with pytest.raises(ValueError, match=range_msg + r".*got float 6.0"):
        rope_forward(x, rotary_dim=6.0)
    with pytest.raises(ValueError, match=r"rotary_dim must be .* <= 7 .*None means D.*got 7"):
        rope_forward(np.ones((2, 5, 7)))  # odd head size and no rotary_dim
    with pytest.raises(ValueError, match=r"layout must be 'half' .* or 'interleaved' .*"
                                         r"got 'neox'"):
        rope_forward(x, layout="neox")
    with pytest.raises(ValueError, match=r"theta must be a finite number > 0, got -1"):
        rope_forward(x, theta=-1.0)
    with pytest.raises(ValueError, match=r"rotary_dim must be an even integer >= 1, got 5"):
        rope_angles(np.arange(4), 5)
    with pytest.raises(ValueError, match=r"dtype must be float32 or float64"):
        rope_angles(np.arange(4), 4, dtype=np.float16)


def test_bad_position_ids_and_x():
    x = np.ones((2, 3, 5, 4))
    shape_msg = (r"position_ids must have shape \(T,\) with T = x.shape\[-2\] = 5 "
                 r"or \(B, T\) with B = x.shape\[0\] = 2")
    with pytest.raises(ValueError, match=shape_msg + r".*got shape \(6,\)"):
        rope_forward(x, np.arange(6))
    with pytest.raises(ValueError, match=shape_msg + r".*got shape \(3, 5\)"):
        rope_forward(x, np.zeros((3, 5), dtype=np.int64))
    with pytest.raises(ValueError, match=shape_msg + r".*got shape \(2, 3, 5\)"):
        rope_forward(x, np.zeros((2, 3, 5), dtype=np.int64))
    with pytest.raises(ValueError, match=r"position_ids must be >= 0.*\[-3\]"):
        rope_forward(x, np.array([0, 1, -3, 2, 4]))
    with pytest.raises(ValueError, match=r"position_ids must be >= 0"):
        rope_angles(np.array([[0, -1]]), 4)
    with pytest.raises(ValueError, match="position_ids must be an integer array"):
        rope_forward(x, np.arange(5.0))
    with pytest.raises(ValueError, match="floating-point"):
        rope_forward(np.ones((3, 4), dtype=np.int32))
    with pytest.raises(ValueError, match="NaN"):
        rope_forward(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="at least 2 dimension"):
        rope_forward(np.ones(4))
    _, cache = rope_forward(x)
    with pytest.raises(ValueError, match="dy must have shape"):
        rope_backward(np.ones((2, 3, 5, 2)), cache)
    with pytest.raises(ValueError, match="dtype"):
        rope_backward(np.ones(x.shape, dtype=np.float32), cache)
