"""EncoderDecoder (the 2017 Transformer): parity with torch.nn.Transformer (logits, every
parameter gradient, the token-vector gradients) in float64 and float32, finite differences
over every parameter, and behaviour: the tied table's three uses, source padding, causal
decoder, bidirectional encoder, bad input.

The torch reference is ``torch.nn.Transformer`` (post-LN, ReLU, batch_first) with the input
stage and the tied head written out here: x = √C · W[ids] + PE[:T], logits = y Wᵀ. Weight
mapping, read from torch's TransformerEncoderLayer / TransformerDecoderLayer.forward
(norm_first=False):

    encoder   x = norm1(x + self_attn(x));  x = norm2(x + ff(x))
    decoder   x = norm1(x + self_attn(x));  x = norm2(x + multihead_attn(x, m));
              x = norm3(x + ff(x))
    ff(x) = linear2(relu(linear1(x))),  in_proj_weight rows = [W_q; W_k; W_v]

so norm1 = attn_norm, norm2 = ffn_norm (encoder) or cross_norm (decoder), norm3 = ffn_norm,
multihead_attn = cross_attn, linear1 = ffn.up, linear2 = ffn.down, and Transformer's
encoder.norm / decoder.norm = encoder_norm / decoder_norm (final_norm=True).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, assert_gradcheck_passes, to_torch
from npformer.functional import cross_entropy_backward, cross_entropy_forward
from npformer.functional.positions import sinusoidal_table
from npformer.gradcheck import check_gradients
from npformer.models import EncoderDecoder, build_model
from npformer.models.blocks import Dropout
from npformer.presets import tiny_config

F64, F32 = np.float64, np.float32
B, S, T = 2, 5, 7  # S != T: the cross-attention scores are (T, S), not square
V, C, H, D, FF = 11, 12, 2, 6, 20  # tiny_config sizes: head size 6 = C // H, as torch needs
PAD = np.array([[False, False, False, True, True],  # True = padding (trailing)
                [False, True, False, False, True]])  # and not left-aligned


def make(seed=0, **overrides):
    overrides.setdefault("dropout", 0.0)
    return EncoderDecoder(tiny_config("transformer-2017", **overrides), seed=seed)


def scramble(model, rng, std=0.3):
    """Unusual non-zero weights: norm weights around 1 but not 1, every bias non-zero."""
    for name, p in model.parameters().items():
        base = 1.0 if name.endswith("norm.weight") else 0.0
        p[...] = (base + std * rng.standard_normal(p.shape)).astype(p.dtype)


def batch(rng):
    return rng.integers(0, V, (B, S)), rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))


def grads_copy(model):
    return {n: g.copy() for n, g in model.gradients().items()}


def assert_grads_close(actual, expected, dtype=F64):
    """Every gradient tensor within the parity tolerance of ``dtype``. The key-projection
    biases' gradients are structurally zero (q·b_k shifts a whole row of scores, which softmax
    ignores; this holds for self- and cross-attention) and come out as rounding noise, so every
    tensor also gets an absolute slack of 1e-14 x the largest gradient of the model (float32
    already has atol 1e-5)."""
    assert set(actual) == set(expected)
    scale = max(float(np.max(np.abs(g))) for g in expected.values())
    atol = 1e-14 * scale if np.dtype(dtype) == F64 else None
    for n, g in actual.items():
        assert_close(g, expected[n], dtype, n, atol=atol)


# ---- the torch reference ------------------------------------------------------------------------


def torch_slots(model, tm):
    """(npformer parameter name, torch parameter, rows) for every npformer parameter."""
    slots = []

    def attention(prefix, mha):
        for i, w in enumerate("qkv"):
            rows = slice(i * C, (i + 1) * C)
            slots.append((f"{prefix}.{w}_proj.weight", mha.in_proj_weight, rows))
            slots.append((f"{prefix}.{w}_proj.bias", mha.in_proj_bias, rows))
        slots.append((f"{prefix}.out_proj.weight", mha.out_proj.weight, None))
        slots.append((f"{prefix}.out_proj.bias", mha.out_proj.bias, None))

    def norm(name, ln):
        slots.append((f"{name}.weight", ln.weight, None))
        slots.append((f"{name}.bias", ln.bias, None))

    def ffn(prefix, layer):
        for ours, theirs in (("up", layer.linear1), ("down", layer.linear2)):
            slots.append((f"{prefix}.ffn.{ours}.weight", theirs.weight, None))
            slots.append((f"{prefix}.ffn.{ours}.bias", theirs.bias, None))

    for l, layer in enumerate(tm.encoder.layers):
        attention(f"encoder.{l}.attn", layer.self_attn)
        norm(f"encoder.{l}.attn_norm", layer.norm1)
        norm(f"encoder.{l}.ffn_norm", layer.norm2)
        ffn(f"encoder.{l}", layer)
    for l, layer in enumerate(tm.decoder.layers):
        attention(f"decoder.{l}.attn", layer.self_attn)
        attention(f"decoder.{l}.cross_attn", layer.multihead_attn)
        norm(f"decoder.{l}.attn_norm", layer.norm1)
        norm(f"decoder.{l}.cross_norm", layer.norm2)
        norm(f"decoder.{l}.ffn_norm", layer.norm3)
        ffn(f"decoder.{l}", layer)
    if model.config.final_norm:
        norm("encoder_norm", tm.encoder.norm)
        norm("decoder_norm", tm.decoder.norm)
    return slots


def torch_reference(model, src, tgt, targets, src_padding_mask=None):
    """Logits, loss, every parameter gradient (npformer names) and the token-vector gradients
    of ``model``'s function computed by torch.nn.Transformer in float64 (float32 weights are
    widened exactly, so a float32 model is compared with float64 maths on its own weights)."""
    cfg = model.config
    tm = torch.nn.Transformer(d_model=C, nhead=H, num_encoder_layers=cfg.encoder_layers,
                              num_decoder_layers=cfg.n_layers, dim_feedforward=FF, dropout=0.0,
                              activation="relu", layer_norm_eps=cfg.norm_eps, batch_first=True,
                              norm_first=False, dtype=torch.float64)
    if not cfg.final_norm:  # the paper's model: no norm after either stack
        tm.encoder.norm = None
        tm.decoder.norm = None
    # Train mode (dropout is 0, so it computes the same function): in eval mode a
    # src_key_padding_mask lets TransformerEncoder take its "sparsity fast path", which turns
    # the input into a nested tensor and returns zeros at the padded positions. (Gradients
    # being enabled also disables that path today; train mode does not rely on it.)
    tm.train()
    params = model.parameters()
    slots = torch_slots(model, tm)
    assert len({name for name, _, _ in slots}) == len(slots)
    assert {name for name, _, _ in slots} | {"embed.tokens.weight"} == set(params)
    with torch.no_grad():
        for name, p, rows in slots:
            p[rows if rows is not None else slice(None)] = to_torch(params[name].astype(F64))
    for p in tm.parameters():
        p.grad = None

    W = to_torch(params["embed.tokens.weight"].astype(F64), requires_grad=True)  # (V, C)
    pe = to_torch(sinusoidal_table(max(S, T), C))  # (P, C) the constant 2017 table
    e_src = W[torch.from_numpy(src)]  # (B, S, C) token vectors
    e_tgt = W[torch.from_numpy(tgt)]  # (B, T, C)
    e_src.retain_grad()
    e_tgt.retain_grad()
    x_src = e_src * C ** 0.5 + pe[:S]
    x_tgt = e_tgt * C ** 0.5 + pe[:T]
    causal = torch.nn.Transformer.generate_square_subsequent_mask(T, dtype=torch.float64)
    pad = None if src_padding_mask is None else torch.from_numpy(src_padding_mask)
    y = tm(x_src, x_tgt, tgt_mask=causal, tgt_is_causal=True, src_key_padding_mask=pad,
           memory_key_padding_mask=pad)  # (B, T, C)
    logits = y @ W.T  # (B, T, V) the tied head
    loss = F.cross_entropy(logits.reshape(-1, V), torch.from_numpy(targets).reshape(-1))
    loss.backward()
    grads = {"embed.tokens.weight": W.grad.numpy()}
    for name, p, rows in slots:
        grads[name] = p.grad[rows if rows is not None else slice(None)].numpy()
    return dict(logits=logits.detach().numpy(), loss=loss.item(), grads=grads,
                d_src=e_src.grad.numpy(), d_tgt=e_tgt.grad.numpy())


def npformer_step(model, src, tgt, targets, src_padding_mask=None):
    logits = model.forward(src, tgt, src_padding_mask=src_padding_mask)
    loss, ce = cross_entropy_forward(logits, targets)  # mean over B·T
    model.zero_grad()
    d_src, d_tgt = model.backward(cross_entropy_backward(np.ones((), logits.dtype), ce))
    return dict(logits=logits, loss=float(loss), grads=grads_copy(model), d_src=d_src,
                d_tgt=d_tgt)


# ---- parity --------------------------------------------------------------------------------------


@pytest.mark.parametrize("padded", [False, True], ids=["no_pad", "src_pad"])
@pytest.mark.parametrize("final_norm", [False, True], ids=["paper", "final_norm"])
def test_float64_parity_with_torch_transformer(final_norm, padded):
    model = make(final_norm=final_norm)
    cfg = model.config
    assert model.training and cfg.tie_embeddings and cfg.scale_embeddings
    sizes = (cfg.vocab_size, cfg.d_model, cfg.n_heads, cfg.head_size, cfg.ffn_width)
    assert sizes == (V, C, H, D, FF) and D == C // H
    rng = np.random.default_rng(10 + 2 * final_norm + padded)
    scramble(model, rng)
    src, tgt, targets = batch(rng)
    mask = PAD if padded else None
    ours = npformer_step(model, src, tgt, targets, mask)
    ref = torch_reference(model, src, tgt, targets, mask)
    assert ours["logits"].dtype == F64 and ours["logits"].shape == (B, T, V)
    assert_close(ours["logits"], ref["logits"], F64, "logits")
    assert abs(ours["loss"] - ref["loss"]) <= 1e-10 * abs(ref["loss"])
    assert_grads_close(ours["grads"], ref["grads"])
    assert_close(ours["d_src"], ref["d_src"], F64, "d_src")
    assert_close(ours["d_tgt"], ref["d_tgt"], F64, "d_tgt")
    # every gradient carries signal (except the structurally zero key biases)
    for n, g in ours["grads"].items():
        assert n.endswith("k_proj.bias") or np.max(np.abs(g)) > 1e-6, n
    if padded:  # padded source tokens reach nothing
        assert np.all(ours["d_src"][PAD] == 0)


def test_float32_parity_with_float64_torch_reference():
    model64 = make(final_norm=True)
    rng = np.random.default_rng(20)
    scramble(model64, rng)
    model = make(final_norm=True, dtype="float32")
    for n, p in model.parameters().items():
        p[...] = model64.parameters()[n]  # rounded to float32 once; the reference sees these
    src, tgt, targets = batch(rng)
    ours = npformer_step(model, src, tgt, targets, PAD)
    ref = torch_reference(model, src, tgt, targets, PAD)
    assert ours["logits"].dtype == F32
    assert ours["d_src"].dtype == F32 and ours["d_tgt"].dtype == F32
    assert all(g.dtype == F32 for g in ours["grads"].values())
    assert_close(ours["logits"], ref["logits"], F32, "logits")
    assert_grads_close(ours["grads"], ref["grads"], F32)
    assert_close(ours["d_src"], ref["d_src"], F32, "d_src")
    assert_close(ours["d_tgt"], ref["d_tgt"], F32, "d_tgt")


# ---- finite differences --------------------------------------------------------------------------


def test_finite_differences_every_parameter():
    """final_norm=True has every parameter of the paper's model plus the two final norms;
    2 + 2 layers, so dm sums over two cross-attentions and flows back through two encoder
    layers. A sample of 8 entries per tensor keeps the ~1500 forwards affordable. The
    cross-attention q/k gradients are small here (~1e-3), so the worst relative errors
    (~5e-7) are the float64 rounding floor of the loss (~5e-10 absolute at h = 1e-6)."""
    model = make(final_norm=True)
    rng = np.random.default_rng(30)
    scramble(model, rng)
    src, tgt, targets = batch(rng)

    def loss_fn():
        loss, _ = cross_entropy_forward(model.forward(src, tgt, src_padding_mask=PAD), targets)
        return float(loss)

    npformer_step(model, src, tgt, targets, PAD)
    params = model.parameters()
    reports = check_gradients("encoder-decoder", loss_fn, params, model.gradients(),
                              max_entries=8)
    assert {r.tensor for r in reports} == set(params)
    assert_gradcheck_passes(reports)


# ---- behaviour -----------------------------------------------------------------------------------


def test_shared_table_gradient_is_the_sum_of_its_three_uses():
    tied = make()
    rng = np.random.default_rng(40)
    scramble(tied, rng)
    untied = make(seed=1, tie_embeddings=False)
    W = tied.parameters()["embed.tokens.weight"]
    three = ("embed.tokens.weight", "src_embed.tokens.weight", "lm_head.weight")
    for n, p in untied.parameters().items():
        p[...] = W if n in three else tied.parameters()[n]
    src, tgt, targets = batch(rng)
    a = npformer_step(tied, src, tgt, targets, PAD)
    b = npformer_step(untied, src, tgt, targets, PAD)
    assert_close(a["logits"], b["logits"], F64, "the same function")
    assert_close(a["d_src"], b["d_src"], F64, "d_src")
    assert_close(a["d_tgt"], b["d_tgt"], F64, "d_tgt")
    tgt_lookup, src_lookup, head = (b["grads"][n] for n in three)
    assert all(np.any(g != 0) for g in (tgt_lookup, src_lookup, head))
    assert_close(a["grads"]["embed.tokens.weight"], tgt_lookup + src_lookup + head, F64,
                 "tied = target lookup + source lookup + head")
    others = lambda grads: {n: g for n, g in grads.items() if n not in three}  # noqa: E731
    assert_grads_close(others(a["grads"]), others(b["grads"]))


def test_a_padded_source_token_changes_nothing():
    model = make(final_norm=True)
    rng = np.random.default_rng(41)
    scramble(model, rng)
    src, tgt, _ = batch(rng)
    logits = model.forward(src, tgt, src_padding_mask=PAD)
    for b, s in zip(*np.nonzero(PAD)):
        changed = src.copy()
        changed[b, s] = (src[b, s] + 1 + s) % V
        np.testing.assert_array_equal(model.forward(changed, tgt, src_padding_mask=PAD), logits)
        # ... while without the mask the same change is seen
        assert not np.allclose(model.forward(changed, tgt), model.forward(src, tgt))


def test_decoder_is_causal():
    model = make()
    rng = np.random.default_rng(42)
    scramble(model, rng)
    src, tgt, _ = batch(rng)
    logits = model.forward(src, tgt)
    for t in range(T):
        changed = tgt.copy()
        changed[:, t] = (tgt[:, t] + 3) % V
        new = model.forward(src, changed)
        np.testing.assert_array_equal(new[:, :t], logits[:, :t])
        diff = np.max(np.abs(new - logits), axis=(0, 2))  # (T,)
        assert np.all(diff[t:] > 1e-6), (t, diff)


def encoder_output(model, src):
    """m (B, S, C), run through the model's own encoder modules (no dropout)."""
    off = Dropout(0.0, np.random.default_rng(0), False)
    m, _ = model.source_embedding.forward(src, np.arange(src.shape[1]), off)
    for block in model.encoder:
        m, _ = block.forward(m, off)
    return m


def test_encoder_is_bidirectional():
    model = make()
    rng = np.random.default_rng(43)
    scramble(model, rng)
    src, tgt, _ = batch(rng)
    logits = model.forward(src, tgt)
    changed = src.copy()
    changed[:, -1] = (src[:, -1] + 4) % V
    # the last source token reaches every target position ...
    diff = np.max(np.abs(model.forward(changed, tgt) - logits), axis=2)  # (B, T)
    assert np.all(diff > 1e-6), diff
    # ... and, inside the encoder, every source position (a causal encoder would only change
    # m[:, -1], which cross-attention still carries to every target position)
    m = encoder_output(model, src)
    diff = np.max(np.abs(encoder_output(model, changed) - m), axis=2)  # (B, S)
    assert np.all(diff > 1e-6), diff


def test_build_model_and_parameter_layout():
    model = build_model(tiny_config("transformer-2017"))
    assert isinstance(model, EncoderDecoder)
    names = set(model.parameters())
    assert "embed.tokens.weight" in names
    absent = ("src_embed", "lm_head", "encoder_norm", "decoder_norm")  # untied / final_norm
    assert not any(n.startswith(absent) for n in names)
    assert not any(n.startswith("encoder.") and "cross" in n for n in names)
    assert {f"decoder.1.cross_attn.{w}_proj.weight" for w in "qkv"} <= names
    norms = set(make(final_norm=True).parameters()) - names
    assert norms == {f"{stack}_norm.{p}" for stack in ("encoder", "decoder")
                     for p in ("weight", "bias")}


# ---- bad input -----------------------------------------------------------------------------------


def test_backward_before_forward_raises():
    with pytest.raises(ValueError, match="forward first"):
        make().backward(np.zeros((B, T, V)))


def test_bad_dlogits_raise():
    model = make()
    rng = np.random.default_rng(44)
    src, tgt, _ = batch(rng)
    logits = model.forward(src, tgt)
    for bad in (np.zeros((B, T, V - 1)), np.zeros((B, S, V)), logits.astype(F32),
                np.full(logits.shape, np.nan)):
        with pytest.raises(ValueError, match="dlogits"):
            model.backward(bad)
    model.backward(np.zeros_like(logits))  # the right one works


def test_mismatched_batch_sizes_raise():
    model = make()
    with pytest.raises(ValueError, match="batch"):
        model.forward(np.zeros((2, S), dtype=np.int64), np.zeros((3, T), dtype=np.int64))


def test_bad_ids_raise():
    model = make()
    ones = lambda n: np.ones((B, n), dtype=np.int64)  # noqa: E731
    for bad, what in [
        (lambda n: np.full((B, n), V), "vocab"),  # out of range (V = 11)
        (lambda n: np.full((B, n), -1), "vocab"),
        (lambda n: np.ones((B, n)), "dtype"),  # float ids
        (lambda n: np.ones(n, dtype=np.int64), "(B, T)"),
        (lambda n: np.zeros((B, 0), dtype=np.int64), "(B, T)"),
        (lambda n: np.zeros((B, 17), dtype=np.int64), "max_seq_len=16"),
    ]:
        with pytest.raises(ValueError, match="src_ids") as info:
            model.forward(bad(S), ones(T))
        assert what in str(info.value), str(info.value)
        with pytest.raises(ValueError, match="tgt_ids") as info:
            model.forward(ones(S), bad(T))
        assert what in str(info.value), str(info.value)
    model.forward(ones(S), ones(T))  # the right ones work


def test_bad_padding_mask_raises():
    model = make()
    src, tgt = np.ones((B, S), dtype=np.int64), np.ones((B, T), dtype=np.int64)
    for bad in (PAD[:, :-1], PAD[0], PAD.T, PAD.tolist()):
        with pytest.raises(ValueError, match="src_padding_mask"):
            model.forward(src, tgt, src_padding_mask=bad)
