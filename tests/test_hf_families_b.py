"""Hugging Face parity of Gemma and Gemma 2 (issue 16) through ``npformer.interop.load_hf``.

The contract is the one of tests/test_hf_rope_families.py (whose generic helpers are reused
here): a ``transformers`` model with random, non-default weights → ``save_pretrained`` →
``load_hf`` → forward, mean cross-entropy, backward; logits, loss and every gradient by
checkpoint name agree with transformers' (float64 within 1e-10 relative under
``exact_float64``, float32 within 1e-4 relative + 1e-5 absolute, stock transformers), and
``npformer.interop.compare.compare_hf_dir`` — what ``npformer compare --hf DIR`` runs, with
the attention ``from_pretrained`` picks (sdpa for Gemma, eager for Gemma 2, which has no sdpa)
— passes every report.

What the families add to Llama, each exercised with non-default values:
- Gemma: a GLU with the tanh GeLU (``hidden_act``; GemmaConfig rewrites the released configs'
  "gelu" to "gelu_pytorch_tanh"), RMSNorms scaling by (1 + w) with w random (not 0), token
  embeddings multiplied by √C in the model's dtype, a tied head, head_dim with H·D ≠ C, GQA,
  and ``pad_token_id`` inside the vocabulary and inside the input (nn.Embedding's
  padding_idx: that row gets no gradient from the lookup);
- Gemma 2: the above (its activation field is ``hidden_activation``, where "gelu" is the erf
  GeLU), plus sandwich norms (four per layer), attention scores soft-capped at
  ``attn_logit_softcapping`` and logits at ``final_logit_softcapping`` — caps chosen small so
  that tanh saturates (checked) — alternating sliding-window and global layers with a window
  shorter than the sequence (checked to change the logits, and the layer order and the
  i − w < j ≤ i convention checked by variants that must miss), and the attention scale
  ``query_pre_attn_scalar^(−1/2)`` with query_pre_attn_scalar ≠ head_dim.

One Gemma case uses a scaled RoPE (yarn, through the rope reader). Measured worst relative
error of compare_hf_dir over logits, loss and every gradient (Intel Xeon, these configs):
float64 3.4e-15 to 7.2e-15, float32 3.1e-6 to 6.4e-6.

Transformers' float32 islands in these families (the (1 + w) RMSNorm, the rotary tables, the
embedding scale buffer, Gemma 2's eager softmax) are removed by ``exact_float64`` patches;
test_float64_patches_change_precision_only checks each patch alone and all together against
stock transformers: a float32-sized difference, never more.
"""

import json

import numpy as np
import pytest
import torch
import transformers

import test_hf_rope_families as rope_families
from helpers import assert_close, assert_hf_round_trip
from npformer.interop import load_hf, save_hf
from npformer.interop.compare import compare_hf_dir
from npformer.interop.hf_config import config_from_hf, hf_config_from_config
from npformer.interop.hf_float64 import _patches, exact_float64

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

# shared with test_hf_rope_families: vocabulary, pad id (in the input ids), batch (B, T) = (2, 7)
V, PAD, MISMATCH = rope_families.V, rope_families.PAD, rope_families.MISMATCH
_batch, _pairs, _assert_pairs = rope_families._batch, rope_families._pairs, rope_families._assert_pairs
_variant, _rel_err, _logits_pair = rope_families._variant, rope_families._rel_err, rope_families._logits_pair
WINDOW = 3  # sliding window of the Gemma 2 cases: shorter than T = 7

CASES = {
    # Gemma's defaults (tanh GeGLU, tied head, no biases) at GQA ratio 2, H·D = 24 ≠ C = 12
    "gemma": ("gemma", dict(
        hidden_size=12, num_attention_heads=4, num_key_value_heads=2, head_dim=6,
        num_hidden_layers=2, intermediate_size=20, max_position_embeddings=16)),
    # the released configs' hidden_act "gelu" (= tanh for Gemma), untied head, attention
    # biases, multi-query, theta 500000, rms_norm_eps 1e-5
    "gemma-gelu-untied": ("gemma", dict(
        hidden_size=18, num_attention_heads=3, num_key_value_heads=1, head_dim=8,
        num_hidden_layers=2, intermediate_size=14, max_position_embeddings=16, hidden_act="gelu",
        tie_word_embeddings=False, attention_bias=True, rms_norm_eps=1e-5,
        rope_parameters=dict(rope_type="default", rope_theta=500000.0))),
    # a scaled RoPE (the rope branch's reader): yarn, factor 4 over an original length 8, the
    # attention factor 0.1 ln 4 + 1 on cos and sin
    "gemma-yarn": ("gemma", dict(
        hidden_size=12, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        num_hidden_layers=2, intermediate_size=16, max_position_embeddings=32,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                             original_max_position_embeddings=8))),
    # Gemma 2's default layer order (sliding, full, sliding, full), window 3 < T, small caps,
    # query_pre_attn_scalar 5 ≠ head_dim 8, H·D = 16 ≠ C = 12
    "gemma2": ("gemma2", dict(
        hidden_size=12, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        num_hidden_layers=4, intermediate_size=20, max_position_embeddings=16,
        sliding_window=WINDOW, query_pre_attn_scalar=5, attn_logit_softcapping=1.5,
        final_logit_softcapping=2.0)),
    # an explicit layer order (full, sliding, sliding), caps off, "gelu" (= erf for Gemma 2),
    # untied head, attention biases, GQA ratio 3
    "gemma2-layers-erf": ("gemma2", dict(
        hidden_size=12, num_attention_heads=6, num_key_value_heads=2, head_dim=4,
        num_hidden_layers=3, intermediate_size=16, max_position_embeddings=16,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"],
        sliding_window=WINDOW, query_pre_attn_scalar=16, attn_logit_softcapping=None,
        final_logit_softcapping=None, hidden_activation="gelu", tie_word_embeddings=False,
        attention_bias=True)),
}
TORCH_DTYPES = {np.dtype(np.float64): torch.float64, np.dtype(np.float32): torch.float32}


def _attention(case, dtype):
    """Gemma: sdpa in float64 (its eager softmax is a float32 island left unpatched), eager in
    float32. Gemma 2: eager always (transformers has no sdpa for it; the float64 patch 11
    removes its float32 softmax)."""
    if CASES[case][0] == "gemma2":
        return "eager"
    return "sdpa" if np.dtype(dtype) == np.float64 else "eager"


def _hf_config(case, **changes):
    model_type, fields = CASES[case]
    return transformers.AutoConfig.for_model(model_type, vocab_size=V, bos_token_id=0,
                                             eos_token_id=2, pad_token_id=PAD,
                                             **{**fields, **changes})


def _hf_model(case, dtype, seed=0, **changes):
    """A transformers model in ``dtype``, every parameter N(0.05, 0.35²) — the norms' w of
    (1 + w) too, so the unit offset is not hidden behind w = 0 — drawn in float64 and rounded
    once (float32 and float64 models of one seed agree)."""
    hf = transformers.AutoModelForCausalLM.from_config(
        _hf_config(case, **changes), attn_implementation=_attention(case, dtype))
    hf = hf.to(TORCH_DTYPES[np.dtype(dtype)]).eval()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for _, p in hf.named_parameters():
            p.copy_(torch.from_numpy(0.35 * rng.standard_normal(tuple(p.shape)) + 0.05))
    return hf


def _checkpoint(case, dtype, path, seed=0, **changes):
    """(HF model, its save_pretrained directory). GemmaConfig stores hidden_act "gelu" as
    "gelu_pytorch_tanh"; config.json then says "gelu" again, as the released configs do."""
    hf = _hf_model(case, dtype, seed, **changes)
    hf.save_pretrained(str(path))
    if CASES[case][1].get("hidden_act") == "gelu" and CASES[case][0] == "gemma":
        file = path / "config.json"
        hf_config = json.loads(file.read_text())
        assert hf_config["hidden_act"] == "gelu_pytorch_tanh"
        file.write_text(json.dumps({**hf_config, "hidden_act": "gelu"}))
    return hf, str(path)


# ---- parity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_float64_parity(tmp_path, case):
    with exact_float64():
        hf, directory = _checkpoint(case, np.float64, tmp_path)
        model = load_hf(directory, dtype=np.float64)
        ids, targets = _batch(1)
        assert (ids == PAD).any()
        pairs = _pairs(model, hf, ids, targets)
    assert len(pairs) > 2 + 10
    _assert_pairs(pairs, np.float64, case)


@pytest.mark.parametrize("case", CASES)
def test_float32_parity(tmp_path, case):
    hf, directory = _checkpoint(case, np.float32, tmp_path)
    model = load_hf(directory, dtype=np.float32)
    ids, targets = _batch(1)
    _assert_pairs(_pairs(model, hf, ids, targets), np.float32, f"{case} float32")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", CASES)
def test_compare_hf_dir_passes(tmp_path, case, dtype):
    """``npformer compare --hf DIR``: transformers loads every tensor, and logits, loss and
    all gradients agree (the reference built by from_pretrained with its own attention
    choice; in float64 under exact_float64)."""
    _, directory = _checkpoint(case, dtype, tmp_path)
    reports = compare_hf_dir(directory, dtype)
    failing = [(r.tensor, r.max_rel_err) for r in reports if not r.passed]
    assert not failing, failing
    assert len(reports) > 10
    worst = max(reports, key=lambda r: r.max_rel_err)
    print(f"{case} {dtype}: worst relative error {worst.max_rel_err:.2e} ({worst.tensor})")


@pytest.mark.parametrize("edit", [
    dict(drop="layer_types"),  # absent: Gemma2Config's default, sliding on even layers
    dict(layer_types=["sliding_attention", "attention"] * 2),  # the legacy name of full
])
def test_gemma2_layer_types_spellings(tmp_path, edit):
    """config.json without layer_types, or with the legacy "attention" that transformers
    remaps to "full_attention", loads the model transformers runs (the "gemma2" case's
    layers are sliding, full, sliding, full)."""
    _, directory = _checkpoint("gemma2", np.float64, tmp_path)
    file = tmp_path / "config.json"
    hf_config = json.loads(file.read_text())
    hf_config.pop(edit.pop("drop", None), None)
    file.write_text(json.dumps({**hf_config, **edit}))
    assert load_hf(directory).config.attention_pattern == ("local", "dense") * 2
    failing = [r.tensor for r in compare_hf_dir(directory, "float64") if not r.passed]
    assert not failing, failing


def test_from_pretrained_picks_eager_for_gemma2(tmp_path):
    """Soft-capping exists only in Gemma 2's eager attention (and flash/flex, not installed):
    from_pretrained must pick it, or compare_hf_dir's reference would run another function."""
    for case, expected in (("gemma2", "eager"), ("gemma", "sdpa")):
        _, directory = _checkpoint(case, np.float32, tmp_path / case)
        hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        assert hf.config._attn_implementation == expected, case


def test_loaded_configs_are_the_awkward_ones(tmp_path):
    """The configs reach the model as intended (so the parity tests test what they claim)."""
    expected = {  # case: (H, K, D, ffn, tied, bias, pattern, window, scale, caps)
        "gemma": (4, 2, 6, "geglu_tanh", True, False, ("dense",), None, None, (None, None)),
        "gemma-gelu-untied": (3, 1, 8, "geglu_tanh", False, True, ("dense",), None, None,
                              (None, None)),
        "gemma-yarn": (2, 1, 8, "geglu_tanh", True, False, ("dense",), None, None, (None, None)),
        "gemma2": (2, 1, 8, "geglu_tanh", True, False, ("local", "dense") * 2, WINDOW,
                   5 ** -0.5, (1.5, 2.0)),
        "gemma2-layers-erf": (6, 2, 4, "geglu", False, True, ("dense", "local", "local"),
                              WINDOW, 0.25, (None, None)),
    }
    assert sorted(expected) == sorted(CASES)
    for case, want in expected.items():
        _, directory = _checkpoint(case, np.float32, tmp_path / case)
        c = load_hf(directory, dtype=np.float32).config
        got = (c.n_heads, c.kv_heads, c.head_size, c.ffn, c.tie_embeddings, c.qkv_bias,
               c.attention_pattern, c.window, c.attention_scale,
               (c.attention_softcap, c.final_logit_softcap))
        assert got == want, case
        assert (c.norm, c.norm_unit_offset, c.scale_embeddings, c.padding_idx, c.rope_layout,
                c.sandwich_norm) == ("rmsnorm", True, True, PAD, "half", CASES[case][0] == "gemma2")
        assert hf_config_from_config(c)["model_type"] == CASES[case][0], case  # first to fit
        yarn = case == "gemma-yarn"
        assert (c.rope_type, c.rope_factor, c.rope_original_max_seq_len) == (
            ("yarn", 4.0, 8) if yarn else ("default", 1.0, None)), case


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", ["gemma", "gemma2"])
def test_embedding_scale_rounds_like_transformers(tmp_path, case, dtype):
    """The scaled lookup is one correctly rounded product per entry, so it can be compared
    bit for bit: ours (√C as a Python float, which NumPy rounds to the array's dtype) equals
    from_pretrained's embed_tokens (torch.tensor(√C) built in the dtype asked for). √12 is not
    a float32 number: a product taken in float64 and then rounded would differ in some entries."""
    from npformer.models.blocks import Dropout

    _, directory = _checkpoint(case, dtype, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=TORCH_DTYPES[np.dtype(dtype)])
    model = load_hf(directory, dtype=dtype)
    ids = _batch(1)[0]
    ours, _ = model.embed.forward(ids, np.arange(ids.shape[1]), Dropout(0.0, np.random.default_rng(0), False))
    with torch.no_grad():
        theirs = hf.model.embed_tokens(torch.from_numpy(ids)).numpy()
    assert ours.dtype == theirs.dtype == dtype
    assert np.array_equal(ours, theirs)
    if dtype == np.float32:  # the comparison can tell the two roundings apart
        table = model.parameters()["embed.tokens.weight"][ids].astype(np.float64)
        assert not np.array_equal((table * np.sqrt(12.0)).astype(np.float32), ours)


# ---- the features bite ---------------------------------------------------------------------------


def _case_model(tmp_path, case):
    hf, directory = _checkpoint(case, np.float64, tmp_path)
    return hf, load_hf(directory)


@pytest.mark.parametrize("case, changes", [
    ("gemma", dict(norm_unit_offset=False)),  # w instead of (1 + w)
    ("gemma", dict(scale_embeddings=False)),  # no √C
    ("gemma", dict(ffn="geglu")),  # erf GeLU instead of tanh
    ("gemma-yarn", dict(rope_type="default", rope_factor=1.0, rope_original_max_seq_len=None)),
    ("gemma-gelu-untied", dict(ffn="geglu")),  # Gemma's "gelu" is the tanh form
    ("gemma2-layers-erf", dict(ffn="geglu_tanh")),  # Gemma 2's "gelu" is the erf form
    ("gemma2", dict(sandwich_norm=False)),
    ("gemma2", dict(attention_scale=None)),  # 1/√D instead of query_pre_attn_scalar^(−1/2)
    ("gemma2", dict(attention_softcap=None)),
    ("gemma2", dict(final_logit_softcap=None)),
    ("gemma2", dict(window=None, attention_pattern=("dense",))),  # the window bites
    ("gemma2", dict(attention_pattern=("dense", "local"))),  # layer 0 is the sliding one
    ("gemma2", dict(window=WINDOW + 1)),  # keys i − w < j ≤ i, not i − w ≤ j ≤ i
    ("gemma2-layers-erf", dict(attention_pattern=("local", "local", "dense"))),
])
def test_each_feature_changes_the_function(tmp_path, case, changes):
    """The loaded model matches transformers, and the same weights under a config without
    the feature (or with the neighbouring convention) miss it by far more than the tolerance
    — so parity really tests each feature. (sandwich_norm=False leaves the post-norm weights
    unused: those variants are built from a copy that drops them.)"""
    with exact_float64():
        hf, model = _case_model(tmp_path, case)
        logits, ref = _logits_pair(model, hf)
        assert_close(logits, ref, np.float64, case)
        if changes.get("sandwich_norm") is False:
            from npformer.models import DecoderLM

            other = DecoderLM(model.config.replace(**changes)).eval()
            for name, value in other.parameters().items():
                value[...] = model.parameters()[name]
            other.hf_model_type = model.hf_model_type
        else:
            other = _variant(model, **changes)
        logits, ref = _logits_pair(other, hf)
    assert _rel_err(logits, ref) > MISMATCH, f"{changes} matched {case}"


def test_soft_caps_saturate(tmp_path, monkeypatch):
    """The caps of the "gemma2" case are small enough that tanh is far from linear somewhere:
    some scaled attention score reaches more than twice attn_logit_softcapping (tanh(2) = 0.96),
    and some raw logit more than twice final_logit_softcapping — while every capped value
    stays inside (−cap, cap)."""
    from transformers.models.gemma2 import modeling_gemma2

    ratios = []
    stock = modeling_gemma2.eager_attention_forward

    def recording(module, query, key, value, attention_mask, **kwargs):
        keys = modeling_gemma2.repeat_kv(key, module.num_key_value_groups)
        scores = torch.matmul(query, keys.transpose(2, 3)) * kwargs["scaling"]
        ratios.append(float(scores.abs().max() / kwargs["softcap"]))
        return stock(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(modeling_gemma2, "eager_attention_forward", recording)
    hf, model = _case_model(tmp_path, "gemma2")
    logits, ref = _logits_pair(model, hf)
    assert len(ratios) == model.config.n_layers and max(ratios) > 2.0, ratios
    raw = _variant(model, final_logit_softcap=None).forward(_batch(1)[0])
    cap = model.config.final_logit_softcap
    assert np.abs(raw).max() > 2 * cap and np.abs(logits).max() < cap


@pytest.mark.parametrize("case", ["gemma", "gemma2", "gemma2-layers-erf"])
def test_kv_cache_decode_equals_the_full_forward(tmp_path, case):
    """A prefill of 2 tokens, then one token at a time through the KV caches, gives the full
    forward's logits at every position (past the window too) — and those are transformers'."""
    with exact_float64():
        hf, model = _case_model(tmp_path, case)
        ids = _batch(3)[0]  # (2, 7)
        full, ref = _logits_pair(model, hf, seed=3)
    assert_close(full, ref, np.float64, f"{case} full forward vs transformers")
    caches = model.new_kv_caches()
    steps = [model.forward(ids[:, :2], kv_caches=caches)]
    steps += [model.forward(ids[:, t:t + 1], kv_caches=caches) for t in range(2, ids.shape[1])]
    decoded = np.concatenate(steps, axis=1)
    assert_close(decoded, full, np.float64, f"{case} KV-cache decode vs full forward")


@pytest.mark.parametrize("case", ["gemma", "gemma2"])
def test_pad_row_gets_no_gradient_from_the_lookup(tmp_path, case):
    """nn.Embedding(padding_idx=pad_token_id), as in Llama: tied (both cases), the pad row's
    gradient is the head's share only; a lookup gradient there would not match."""
    with exact_float64():
        hf, model = _case_model(tmp_path, case)
        assert model.config.padding_idx == PAD == hf.model.embed_tokens.padding_idx
        ids, targets = _batch(1)
        theirs = _pairs(model, hf, ids, targets)["d model.embed_tokens.weight"][1]
        _, _, grads = rope_families._ours(_variant(model, padding_idx=None), ids, targets)
    table = grads["model.embed_tokens.weight"]
    others = np.arange(V) != PAD
    assert_close(table[others], theirs[others], np.float64, "rows other than the pad")
    assert _rel_err(table[PAD], theirs[PAD]) > MISMATCH


# ---- float64 reference ---------------------------------------------------------------------------


def _family_of(owner) -> str:
    """The transformers model family a patch's owner (a class or a module) belongs to."""
    module = owner.__name__ if isinstance(owner, type(np)) else owner.__module__
    return module.rsplit(".", 1)[-1].removeprefix("modeling_")


def _gemma_patches():
    return [(owner, name, new) for owner, name, new in _patches()
            if _family_of(owner) in ("gemma", "gemma2")]


@pytest.mark.parametrize("case", CASES)
def test_float64_patches_change_precision_only(case, monkeypatch):
    """Stock transformers in float64 against the patched reference — each patch of the case's
    family alone, then all: every one changes the logits (it removes a float32 island the
    model really runs through) by a float32-sized amount (< 1e-5 relative), so no patch
    changes a formula; and all together they are needed (stock misses 1e-10)."""
    family = CASES[case][0]
    ids, _ = _batch(1)
    hf = _hf_model(case, np.float64)
    with torch.no_grad():
        stock = hf(torch.from_numpy(ids)).logits.numpy()
        for owner, name, replacement in _gemma_patches():
            if _family_of(owner) != family:
                continue
            with monkeypatch.context() as patch:
                patch.setattr(owner, name, replacement)
                alone = hf(torch.from_numpy(ids)).logits.numpy()
            difference = _rel_err(stock, alone)
            assert 0 < difference < 1e-5, f"{case}: {owner}.{name}: stock vs patched {difference:.3e}"
        with exact_float64():
            patched = hf(torch.from_numpy(ids)).logits.numpy()
    difference = _rel_err(stock, patched)
    assert 1e-10 < difference < 1e-5, f"{case}: stock vs patched {difference:.3e}"


def test_every_gemma_patch_is_exercised():
    """The patches the test above applies one by one — the (1 + w) norms, the rotary tables
    and the embedding scale of both families, and Gemma 2's eager attention — and a case of
    each family (Gemma 2's eager attention runs in its float64 cases)."""
    names = sorted(f"{_family_of(owner)}:{getattr(owner, '__qualname__', '')}.{name}"
                   for owner, name, _ in _gemma_patches())
    assert names == sorted([
        "gemma:GemmaRMSNorm.forward", "gemma2:Gemma2RMSNorm.forward",
        "gemma:GemmaRotaryEmbedding.forward", "gemma2:Gemma2RotaryEmbedding.forward",
        "gemma:GemmaTextScaledWordEmbedding.forward",
        "gemma2:Gemma2TextScaledWordEmbedding.forward", "gemma2:.eager_attention_forward"])
    assert {model_type for model_type, _ in CASES.values()} == {"gemma", "gemma2"}
    assert all(_attention(case, np.float64) == "eager" for case in CASES
               if CASES[case][0] == "gemma2")


# ---- round trip ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", CASES)
def test_round_trip(tmp_path, case, dtype):
    """load_hf → save_hf writes the very tensors of save_pretrained (byte for byte, a tied
    head omitted by both), and from_pretrained of it computes the original's logits."""
    with exact_float64(enabled=dtype == np.float64):
        hf, first = _checkpoint(case, dtype, tmp_path / "hf")
        ids, _ = _batch(2)
        assert_hf_round_trip(hf, first, str(tmp_path / "npformer"), CASES[case][0], dtype, ids,
                             attn_implementation=_attention(case, dtype))


def test_save_hf_refuses_a_gemma2_scale_that_is_not_an_integer_scalar(tmp_path):
    """query_pre_attn_scalar is an int in transformers: a scale that is not n^(−1/2) for a
    whole n cannot be written as gemma2 (and no other family reproduces the model)."""
    with exact_float64():
        _, directory = _checkpoint("gemma2", np.float64, tmp_path / "hf")
        model = _variant(load_hf(directory), attention_scale=0.3)
    with pytest.raises(ValueError, match=r"gemma2.*query_pre_attn_scalar"):
        save_hf(model, str(tmp_path / "out"), model_type="gemma2")


# ---- what the reader refuses ----------------------------------------------------------------------

_GEMMA = dict(model_type="gemma", vocab_size=V, hidden_size=12, num_attention_heads=4,
              num_key_value_heads=2, head_dim=6, num_hidden_layers=2, intermediate_size=20,
              max_position_embeddings=16)
_GEMMA2 = {**_GEMMA, "model_type": "gemma2", "num_hidden_layers": 3, "sliding_window": 3}


@pytest.mark.parametrize("hf, message", [
    ({**_GEMMA, "hidden_act": "relu2"}, r"field hidden_act='relu2' is not supported for "
                                        r"model_type 'gemma'; supported: \["),
    ({**_GEMMA2, "hidden_activation": "quick_gelu"}, r"field hidden_activation='quick_gelu' is "
                                                     r"not supported for model_type 'gemma2'"),
    ({**_GEMMA, "num_key_value_heads": 3}, r"field num_key_value_heads=3 must be an integer ≥ 1 "
                                           r"dividing num_attention_heads=4"),
    ({**_GEMMA, "num_key_value_heads": None}, r"field num_key_value_heads is null"),
    ({**_GEMMA, "head_dim": None}, r"field head_dim is null"),
    ({**_GEMMA2, "num_attention_heads": 5, "num_key_value_heads": 1},
     r"field hidden_size=12 must be a multiple of num_attention_heads=5"),
    ({**_GEMMA2, "layer_types": ["sliding_attention", "chunked_attention", "full_attention"]},
     r"field layer_types=\[.*'chunked_attention'.*\] must list"),
    ({**_GEMMA2, "layer_types": ["sliding_attention", "full_attention"]},
     r"field layer_types has 2 entries for num_hidden_layers=3"),
    ({**_GEMMA2, "sliding_window": None}, r"field sliding_window is null"),
    ({**_GEMMA2, "query_pre_attn_scalar": 200.5}, r"field query_pre_attn_scalar=200.5 must be "
                                                  r"an integer"),
    ({**_GEMMA2, "attn_logit_softcapping": 0.0}, r"field attn_logit_softcapping=0.0 must be > 0"),
    ({**_GEMMA2, "final_logit_softcapping": "30"}, r"field final_logit_softcapping='30' must be "
                                                   r"a number"),
    ({**_GEMMA, "use_bidirectional_attention": True},
     r"field use_bidirectional_attention=True is not supported"),
    ({**_GEMMA2, "is_causal": False}, r"field is_causal=False is not supported"),
    ({**_GEMMA, "partial_rotary_factor": 0.5}, r"partial_rotary_factor=0.5 is not supported"),
    ({**_GEMMA2, "rope_parameters": dict(rope_type="no-such-type", rope_theta=10000.0)},
     r"rope_type='no-such-type'"),
])
def test_bad_configs_are_refused_by_name(hf, message):
    with pytest.raises(ValueError, match=message):
        config_from_hf(hf)


def test_absent_fields_mean_transformers_defaults():
    """A config.json without the keys means GemmaConfig's / Gemma2Config's defaults: pad id 0
    (a padding_idx), head_dim 256, tanh GeGLU, a tied head, theta 10000; for Gemma 2 sliding
    layers 0, 2, 4, … with window 4096, caps 50 and 30, query_pre_attn_scalar 256."""
    bare = dict(vocab_size=V, hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
                num_hidden_layers=3, intermediate_size=20, max_position_embeddings=16)
    for model_type in ("gemma", "gemma2"):
        c = config_from_hf({"model_type": model_type, **bare})
        assert (c.padding_idx, c.head_size, c.ffn, c.tie_embeddings, c.rope_theta, c.norm_eps) == (
            0, 256, "geglu_tanh", True, 10000.0, 1e-6), model_type
        hf = transformers.AutoConfig.for_model(model_type, **bare)  # what transformers fills in
        assert (hf.pad_token_id, hf.head_dim, hf.tie_word_embeddings, hf.rms_norm_eps,
                hf.rope_parameters["rope_theta"]) == (0, 256, True, 1e-6, 10000.0)
        if model_type == "gemma2":
            assert (c.attention_pattern, c.window, c.attention_softcap, c.final_logit_softcap,
                    c.attention_scale) == (("local", "dense", "local"), 4096, 50.0, 30.0, 1 / 16)
            assert (hf.layer_types, hf.sliding_window, hf.attn_logit_softcapping,
                    hf.final_logit_softcapping, hf.query_pre_attn_scalar, hf.hidden_activation) == (
                ["sliding_attention", "full_attention", "sliding_attention"], 4096, 50.0, 30.0,
                256, "gelu_pytorch_tanh")
        else:
            assert (c.attention_scale, c.attention_softcap, c.final_logit_softcap) == (None,) * 3
