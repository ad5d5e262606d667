"""The two ends every model shares, tested on their own: the input stage
(npformer.models.input_embedding: token lookup, √C scaling, learned or sinusoidal positions,
dropout, or caller-given ``inputs_embeds``) and the output head with train/eval mode and the
construction checks (npformer.models.language_model).

Each is checked by central finite differences in float64 (every table and the returned
gradient of the token vectors) and against the same computation written with torch autograd
(float64 1e-10, float32 1e-4; tests/helpers.py), and each refuses bad input with a message.
"""

import numpy as np
import pytest
import torch

from helpers import assert_close, assert_gradcheck_passes
from npformer.gradcheck import check_pair
from npformer.models import DecoderLM, EncoderDecoder, build_model
from npformer.models.blocks import Dropout
from npformer.models.input_embedding import InputEmbedding, check_row_ids, check_token_ids
from npformer.presets import preset_config

V, C, P = 11, 8, 9  # vocabulary, width, position table length
IDS = np.array([[1, 4, 4, 0, 10], [3, 2, 7, 7, 1]])  # (B, T) = (2, 5), repeated tokens

# (preset whose input stage it is, positions, scale_embeddings)
INPUT_CASES = {
    "learned": ("gpt2", "learned", False),  # GPT-1 … GPT-Neo
    "sinusoidal-scaled": ("transformer-2017", "sinusoidal", True),  # 2017: √C · e + PE
    "none": ("llama1", "rope", False),  # RoPE models add nothing at the input
}


def _config(case, dtype="float64", **changes):
    preset, positions, scaled = INPUT_CASES[case]
    config = preset_config(preset, vocab_size=V, d_model=C, n_heads=2, n_layers=1,
                           max_seq_len=P, dtype=dtype, **changes)
    assert config.positions == positions and config.scale_embeddings == scaled
    return config


def _stage(case, dtype="float64", **changes):
    config = _config(case, dtype, **changes)
    stage = InputEmbedding(config, np.random.default_rng(0))
    return config, stage


def _no_dropout():
    return Dropout(0.0, np.random.default_rng(0), training=False)


# ---- finite differences ---------------------------------------------------------------------


@pytest.mark.parametrize("case", INPUT_CASES)
def test_input_stage_table_gradients_by_finite_differences(case):
    """d(Σ x ⊙ probe) / d(token table) and / d(position table), through the module."""
    config, stage = _stage(case)
    position_ids = np.array([2, 3, 4, 5, 6])  # not starting at 0: the right rows get dx

    def forward(token_table, position_table):
        stage.tokens.params["weight"][...] = token_table
        if position_table is not None:
            stage.params["position_table"][...] = position_table
        return stage.forward(IDS, position_ids, _no_dropout())

    def backward(dx, cache):
        stage.zero_grad()
        stage.backward(dx, cache)
        return stage.tokens.grads["weight"].copy(), (
            stage.grads["position_table"].copy() if "position_table" in stage.grads else None)

    inputs = {"token_table": stage.tokens.params["weight"].copy(),
              "position_table": stage.params.get("position_table")}
    inputs["position_table"] = (None if inputs["position_table"] is None
                                else inputs["position_table"].copy())
    names = ("token_table", "position_table" if config.positions == "learned" else None)
    assert_gradcheck_passes(check_pair(f"input_stage_{case}", forward, backward, inputs, names))


@pytest.mark.parametrize("case", INPUT_CASES)
def test_returned_gradient_is_that_of_the_token_vectors(case):
    """With inputs_embeds e, backward returns dL/de, checked by finite differences on e."""
    _, stage = _stage(case)
    position_ids = np.arange(5)

    def forward(inputs_embeds):
        return stage.forward(None, position_ids, _no_dropout(), inputs_embeds=inputs_embeds)

    def backward(dx, cache):
        stage.zero_grad()
        return stage.backward(dx, cache)

    e = np.random.default_rng(1).standard_normal((2, 5, C))
    assert_gradcheck_passes(check_pair(f"input_embeds_{case}", forward, backward,
                                       {"inputs_embeds": e}, ("inputs_embeds",)))
    assert not np.any(stage.tokens.grads["weight"])  # the table was not used, so no gradient


# ---- torch parity ---------------------------------------------------------------------------


def _torch_sinusoidal(positions, width, dtype):
    """PE[pos, 2i] = sin(pos / 10000^(2i/C)), PE[pos, 2i+1] = cos(…) (Vaswani et al. 2017)."""
    i = torch.arange(0, width, 2, dtype=dtype)
    angles = positions[:, None].to(dtype) / (10000.0 ** (i / width))  # (T, C/2)
    table = torch.zeros(len(positions), width, dtype=dtype)
    table[:, 0::2], table[:, 1::2] = torch.sin(angles), torch.cos(angles)
    return table


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", INPUT_CASES)
def test_input_stage_matches_torch(case, dtype):
    config, stage = _stage(case, dtype)
    position_ids = np.array([1, 2, 3, 4, 5])
    x, cache = stage.forward(IDS, position_ids, _no_dropout())
    dx = np.random.default_rng(2).standard_normal(x.shape).astype(dtype)
    stage.zero_grad()
    de = stage.backward(dx, cache)

    table = torch.from_numpy(stage.tokens.params["weight"].copy()).requires_grad_()
    e = torch.nn.functional.embedding(torch.from_numpy(IDS), table)  # (B, T, C)
    e.retain_grad()
    x_ref = e * stage.scale
    if config.positions == "learned":
        positions = torch.from_numpy(stage.params["position_table"].copy()).requires_grad_()
        x_ref = x_ref + torch.nn.functional.embedding(torch.from_numpy(position_ids), positions)
    elif config.positions == "sinusoidal":
        x_ref = x_ref + _torch_sinusoidal(torch.from_numpy(position_ids), C, table.dtype)
    x_ref.backward(torch.from_numpy(dx))
    np_dtype = np.dtype(dtype)
    assert_close(x, x_ref.detach().numpy(), np_dtype, f"{case} x")
    assert_close(de, e.grad.numpy(), np_dtype, f"{case} de")
    assert_close(stage.tokens.grads["weight"], table.grad.numpy(), np_dtype, f"{case} dW_tok")
    if config.positions == "learned":
        assert_close(stage.grads["position_table"], positions.grad.numpy(), np_dtype,
                     f"{case} dP")


def test_dropout_mask_is_replayed_in_the_backward():
    """In training the stage drops entries with a fresh mask; the backward applies the same
    mask (dropped entries give no gradient to their token rows)."""
    _, stage = _stage("learned")
    x, cache = stage.forward(IDS, np.arange(5), Dropout(0.5, np.random.default_rng(3), True))
    stage.zero_grad()
    de = stage.backward(np.ones_like(x), cache)
    dropped = x == 0
    assert dropped.any() and not dropped.all()
    assert np.all(de[dropped] == 0) and np.all(de[~dropped] == 2.0)  # 1 / (1 − p) = 2


# ---- bad input --------------------------------------------------------------------------------


def test_input_stage_refuses_bad_inputs_embeds():
    _, stage = _stage("learned")
    good = np.zeros((2, 5, C))
    with pytest.raises(ValueError, match="inputs_embeds must have shape"):
        stage.forward(None, np.arange(5), _no_dropout(), inputs_embeds=np.zeros((2, 5, C + 1)))
    with pytest.raises(ValueError, match="dtype float32"):
        stage.forward(None, np.arange(5), _no_dropout(), inputs_embeds=good.astype(np.float32))
    with pytest.raises(ValueError, match="NaN"):
        bad = good.copy()
        bad[1, 2, 3] = np.nan
        stage.forward(None, np.arange(5), _no_dropout(), inputs_embeds=bad)


@pytest.mark.parametrize("ids, message", [
    ([[1, 2]], "must be a \\(B, T\\) integer array"),  # a list, not an array
    (np.array([1, 2]), "must be a \\(B, T\\) integer array"),  # 1-D
    (np.zeros((2, 0), dtype=int), "B, T ≥ 1"),
    (np.array([[1.0, 2.0]]), "must hold integers"),
])
def test_check_token_ids(ids, message):
    with pytest.raises(ValueError, match=message):
        check_token_ids(ids, "ids", V)


def test_check_token_ids_passes_good_ids_and_the_embedding_checks_their_range():
    assert check_token_ids(IDS, "ids", V) is IDS
    _, stage = _stage("learned")
    with pytest.raises(ValueError, match=str(V)):
        stage.forward(np.array([[0, V]]), np.arange(2), _no_dropout())


def test_check_row_ids():
    assert check_row_ids(None, "doc_ids", (2, 5)) is None
    doc_ids = np.zeros((2, 5), dtype=int)
    assert check_row_ids(doc_ids, "doc_ids", (2, 5)) is doc_ids
    with pytest.raises(ValueError, match="doc_ids must be a numpy array"):
        check_row_ids([[0] * 5] * 2, "doc_ids", (2, 5))
    with pytest.raises(ValueError, match="doc_ids"):
        check_row_ids(np.zeros((2, 4), dtype=int), "doc_ids", (2, 5))


# ---- the output head (language_model.py) ----------------------------------------------------

HEAD_CASES = {
    "tied": dict(tie_embeddings=True, lm_head_bias=False),
    "tied-with-bias": dict(tie_embeddings=True, lm_head_bias=True),
    "untied-with-bias": dict(tie_embeddings=False, lm_head_bias=True),
    "untied-scaled": dict(tie_embeddings=False, lm_head_bias=False, logit_scale=0.5),  # Cohere
}


def _head_model(case, dtype="float64"):
    config = preset_config("gpt2", vocab_size=V, d_model=C, n_heads=2, n_layers=1, max_seq_len=P,
                           dtype=dtype, **HEAD_CASES[case])
    return DecoderLM(config, seed=0).eval()


@pytest.mark.parametrize("case", HEAD_CASES)
def test_head_gradients_by_finite_differences(case):
    """dL/dx of the head (x: the final hidden states) and its parameters, tied table included."""
    model = _head_model(case)
    x0 = np.random.default_rng(4).standard_normal((2, 5, C))
    names = ["x", "table"] + (["bias"] if HEAD_CASES[case]["lm_head_bias"] else [])

    def weight_and_bias():
        if model.config.tie_embeddings:
            return model.embed.tokens.params, "weight", model.params, "lm_head_bias"
        return model.lm_head.params, "weight", model.lm_head.params, "bias"

    def forward(x, table, bias=None):
        w_owner, w_name, b_owner, b_name = weight_and_bias()
        w_owner[w_name][...] = table
        if bias is not None:
            b_owner[b_name][...] = bias
        return model._head_forward(x)

    def backward(dlogits, cache):
        model.zero_grad()
        dx = model._head_backward(dlogits, cache)
        grads = dict(model.named_gradients())
        w_key = "embed.tokens.weight" if model.config.tie_embeddings else "lm_head.weight"
        b_key = "lm_head_bias" if model.config.tie_embeddings else "lm_head.bias"
        out = [dx, grads[w_key].copy()]
        if b_key in grads:
            out.append(grads[b_key].copy())
        return tuple(out)

    w_owner, w_name, b_owner, b_name = weight_and_bias()
    inputs = {"x": x0, "table": w_owner[w_name].copy()}
    if "bias" in names:
        inputs["bias"] = np.random.default_rng(5).standard_normal(V)
    assert_gradcheck_passes(check_pair(f"head_{case}", forward, backward, inputs, names))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", HEAD_CASES)
def test_head_matches_torch(case, dtype):
    model = _head_model(case, dtype)
    x = np.random.default_rng(6).standard_normal((2, 5, C)).astype(dtype)
    logits, cache = model._head_forward(x)
    dlogits = np.random.default_rng(7).standard_normal(logits.shape).astype(dtype)
    model.zero_grad()
    dx = model._head_backward(dlogits, cache)
    grads = dict(model.named_gradients())

    config = model.config
    tied = config.tie_embeddings
    weight = (model.embed.tokens.params["weight"] if tied else model.lm_head.params["weight"])
    tw = torch.from_numpy(weight.copy()).requires_grad_()
    tx = torch.from_numpy(x.copy()).requires_grad_()
    bias_key = ("lm_head_bias" if tied else "lm_head.bias") if config.lm_head_bias else None
    tb = None
    if bias_key:
        bias = model.params["lm_head_bias"] if tied else model.lm_head.params["bias"]
        tb = torch.from_numpy(bias.copy()).requires_grad_()
    ref = torch.nn.functional.linear(tx, tw, tb) * config.logit_scale
    ref.backward(torch.from_numpy(dlogits))
    np_dtype = np.dtype(dtype)
    assert_close(logits, ref.detach().numpy(), np_dtype, f"{case} logits")
    assert_close(dx, tx.grad.numpy(), np_dtype, f"{case} dx")
    w_key = "embed.tokens.weight" if tied else "lm_head.weight"
    assert_close(grads[w_key], tw.grad.numpy(), np_dtype, f"{case} dW")
    if bias_key:
        assert_close(grads[bias_key], tb.grad.numpy(), np_dtype, f"{case} db")


def test_tied_table_collects_both_uses():
    """Tied, the token table serves the input lookup and the head, so its gradient is the sum
    of the two uses: it equals an untied twin's embedding gradient plus its head gradient,
    when the twin's head holds the same table and every other weight is the same."""
    sizes = dict(vocab_size=V, d_model=C, n_heads=2, n_layers=1, max_seq_len=P, dtype="float64")
    tied = build_model(preset_config("gpt2", tie_embeddings=True, **sizes)).eval()
    untied = build_model(preset_config("gpt2", tie_embeddings=False, **sizes)).eval()
    tied_params = dict(tied.named_parameters())
    for name, value in untied.named_parameters():
        value[...] = tied_params["embed.tokens.weight" if name == "lm_head.weight" else name]
    dlogits = np.random.default_rng(8).standard_normal((2, 5, V))
    grads = []
    for model in (tied, untied):
        model.forward(IDS)
        model.zero_grad()
        model.backward(dlogits)
        grads.append(dict(model.named_gradients()))
    both = grads[1]["embed.tokens.weight"] + grads[1]["lm_head.weight"]
    assert_close(grads[0]["embed.tokens.weight"], both, np.dtype(np.float64), "tied = both uses")
    unused = np.setdiff1d(np.arange(V), IDS)  # rows only the head touches
    assert unused.size and np.all(np.abs(grads[0]["embed.tokens.weight"][unused]).max(axis=1) > 0)


# ---- construction, mode, order ----------------------------------------------------------------


def test_models_refuse_the_wrong_config():
    with pytest.raises(ValueError, match="config must be a ModelConfig"):
        DecoderLM({"d_model": 8})
    with pytest.raises(ValueError, match="use npformer.models.build_model"):
        DecoderLM(preset_config("transformer-2017", vocab_size=V, d_model=C, n_heads=2,
                                n_layers=1))
    with pytest.raises(ValueError, match="use npformer.models.build_model"):
        EncoderDecoder(preset_config("gpt2", vocab_size=V, d_model=C, n_heads=2, n_layers=1))


def test_train_eval_and_backward_order():
    model = DecoderLM(preset_config("gpt2", vocab_size=V, d_model=C, n_heads=2, n_layers=1))
    assert model.training  # a new model trains, as in torch
    assert model.eval() is model and not model.training
    assert model.train() is model and model.training
    fresh = _head_model("tied")
    with pytest.raises(ValueError, match="backward needs a forward first"):
        fresh.backward(np.zeros((2, 5, V)))
