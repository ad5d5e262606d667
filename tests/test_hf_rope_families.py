"""Hugging Face parity of the RoPE families — gpt_neox, llama, cohere — through
``npformer.interop.load_hf``.

The contract under test, per config: a ``transformers`` model with random, non-default weights
(norm gains N(1, 0.25²), every bias and matrix off-centre) → ``save_pretrained(dir)`` →
``load_hf(dir, dtype)`` → forward, mean cross-entropy, backward → ``hf_state_dict(model,
grads=True)`` has exactly the Hugging Face model's parameter names (checkpoint spelling, see
``hf_parameter_name``) and equals its ``.grad`` tensor by tensor; the logits and the loss too.
float64 within 1e-10 relative, float32 within 1e-4 relative + 1e-5 absolute (tests/helpers.py).

The configs are deliberately awkward: B = 2, T = 7 (odd), head size 6 everywhere (not a power
of two), and
- GPT-NeoX parallel (two norms, x + attn(ln1 x) + mlp(ln2 x)) and sequential, rotating 4 of
  the 6 head channels (partial_rotary_factor 2/3: transformers takes int(6 · 2/3) = 4), with
  and without attention biases, exact-erf and tanh GeLU, untied head (NeoX's default);
- Llama with MHA, GQA ratio 3 (6 query heads, 2 key/value heads) and MQA (1 key/value head),
  ``head_dim`` 6 with H·D ≠ C (q_proj (36, 18), say), rope_theta 500000, attention biases,
  tied and untied heads, and a pad_token_id that appears in the input;
- Cohere: parallel block with one bias-free LayerNorm, interleaved RoPE, logit_scale 0.5,
  GQA, tied head (Cohere's default), attention biases.

Float64 references run under :func:`npformer.interop.hf_float64.exact_float64`, which removes
the float32 islands of transformers (RoPE tables, Llama RMSNorm, Cohere LayerNorm and rotation)
with the same formulas in float64, and with ``attn_implementation="sdpa"``: the eager attention
of all three families takes its softmax in float32. test_float64_patches_change_precision_only
checks that stock and patched models differ by a float32-sized amount, no more. Float32 runs
stock transformers with eager attention. The loss is never Hugging Face's built-in one (it
upcasts to float32): mean cross-entropy is computed here in the logits' dtype on the torch
side, and with npformer.functional.cross_entropy_forward / _backward on ours.

Known traps, one test each: NeoX rotates the first rotary_dim channels *half-split* (Cohere
rotates interleaved pairs; swapping the layouts, or rotating all channels, does not match);
Llama's (and Cohere's) embedding has ``padding_idx = pad_token_id``, so the pad row gets no
gradient from the lookup (zero when untied; the head's share only when tied); Llama 3's
document mask equals Hugging Face run on each document separately. Our positions do not
restart per document (npformer/models/decoder.py: ``position_ids = past + arange(T)``), so
each document's run gets its global positions as ``position_ids`` (with RoPE the scores depend
on i − j only, so restarting would agree up to rounding anyway). Then the fields our loader
refuses (Cohere's use_qk_norm, Llama's mlp_bias, scaled RoPE) must raise a ValueError naming
the field, and the round trip load_hf → save_hf reproduces the checkpoint byte for byte and
from_pretrained of it the original logits.

One more trap, in both directions: transformers' Llama and Cohere ignore rope_parameters'
partial_rotary_factor (they always rotate all head channels; only NeoX reads it), so load_hf
must not turn that field into a partial rotary_dim, and save_hf must not write a partially
rotating model as llama/cohere.
"""


import numpy as np
import pytest
import torch
import transformers

from helpers import assert_close, assert_hf_round_trip, max_errors
from npformer.functional import cross_entropy_backward, cross_entropy_forward
from npformer.interop import hf_state_dict, load_hf, save_hf
from npformer.interop.hf_float64 import exact_float64, hf_parameter_name
from npformer.models import DecoderLM

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

B, T = 2, 7  # batch 2, odd sequence length
PAD = 1  # pad_token_id of every config; it appears in the input ids (see _batch)
MISMATCH = 1e-6  # a trap variant must miss the reference by this much (10⁴ × the tolerance)
V = 47  # vocabulary


def _rope(theta, **extra):
    return dict(rope_type="default", rope_theta=theta, **extra)


# (model_type, transformers config fields). Every head has D = 6 channels.
CASES = {
    # NeoX's default parallel block; rotary on int(6 · 2/3) = 4 channels; biases; erf GeLU
    "neox-parallel": ("gpt_neox", dict(
        hidden_size=12, num_attention_heads=2, num_hidden_layers=2, intermediate_size=20,
        max_position_embeddings=16, use_parallel_residual=True, hidden_act="gelu",
        rope_parameters=_rope(10000.0, partial_rotary_factor=2 / 3))),
    # sequential NeoX (Pythia-style configs use both), no biases, tanh GeLU, theta 500000
    "neox-sequential": ("gpt_neox", dict(
        hidden_size=18, num_attention_heads=3, num_hidden_layers=2, intermediate_size=22,
        max_position_embeddings=16, use_parallel_residual=False, attention_bias=False,
        hidden_act="gelu_new", rope_parameters=_rope(500000.0, partial_rotary_factor=2 / 3))),
    # Llama, MHA, H·D = 18 ≠ C = 12, biased attention, untied head
    "llama-mha": ("llama", dict(
        hidden_size=12, num_attention_heads=3, num_key_value_heads=3, head_dim=6,
        num_hidden_layers=2, intermediate_size=20, max_position_embeddings=16,
        attention_bias=True, tie_word_embeddings=False, rms_norm_eps=1e-5,
        rope_parameters=_rope(500000.0))),
    # Llama 3 shape: GQA ratio 3 (H = 6, K = 2), H·D = 36 ≠ C = 18, tied head
    "llama-gqa": ("llama", dict(
        hidden_size=18, num_attention_heads=6, num_key_value_heads=2, head_dim=6,
        num_hidden_layers=2, intermediate_size=22, max_position_embeddings=16,
        attention_bias=False, tie_word_embeddings=True, rope_parameters=_rope(500000.0))),
    # multi-query Llama (K = 1), biased attention, untied head
    "llama-mqa": ("llama", dict(
        hidden_size=18, num_attention_heads=3, num_key_value_heads=1,
        num_hidden_layers=2, intermediate_size=14, max_position_embeddings=16,
        attention_bias=True, tie_word_embeddings=False, rope_parameters=_rope(500000.0))),
    # Cohere: parallel block, one bias-free LayerNorm, interleaved RoPE, logit_scale 0.5,
    # GQA ratio 2, tied head (the default)
    "cohere": ("cohere", dict(
        hidden_size=24, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        intermediate_size=20, max_position_embeddings=16, logit_scale=0.5, use_qk_norm=False,
        attention_bias=True, rope_parameters=_rope(10000.0))),
}
TORCH_DTYPES = {np.dtype(np.float64): torch.float64, np.dtype(np.float32): torch.float32}


# ---- building, running, comparing ---------------------------------------------------------------


def _hf_config(case, **changes):
    model_type, fields = CASES[case]
    # explicit special ids inside the tiny vocabulary (else transformers warns about them)
    return transformers.AutoConfig.for_model(model_type, vocab_size=V, bos_token_id=0,
                                             eos_token_id=2, pad_token_id=PAD,
                                             **{**fields, **changes})


def _attention(dtype):
    """sdpa in float64 (the eager softmax of these families runs in float32), eager in
    float32 (stock transformers)."""
    return "sdpa" if np.dtype(dtype) == np.float64 else "eager"


def _is_norm(module):
    return isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith(
        ("RMSNorm", "LayerNorm"))


def _hf_model(case, dtype, seed=0, **changes):
    """A transformers model in ``dtype`` with random weights: norm gains N(1, 0.25²), every
    bias non-zero, every matrix and table off-centre (the pad row too). The values are drawn
    in float64 and rounded once, so float32 and float64 models of one seed agree."""
    hf = transformers.AutoModelForCausalLM.from_config(_hf_config(case, **changes),
                                                       attn_implementation=_attention(dtype))
    hf = hf.to(TORCH_DTYPES[np.dtype(dtype)]).eval()
    rng = np.random.default_rng(seed)
    gains = {f"{name}.weight" for name, module in hf.named_modules() if _is_norm(module)}
    with torch.no_grad():
        for name, p in hf.named_parameters():  # a tied table appears once
            z = rng.standard_normal(tuple(p.shape))
            value = 1.0 + 0.25 * z if name in gains else 0.35 * z + 0.05
            p.copy_(torch.from_numpy(value))
    return hf


def _checkpoint(case, dtype, path, seed=0, **changes):
    """(HF model, its save_pretrained directory)."""
    hf = _hf_model(case, dtype, seed, **changes)
    hf.save_pretrained(str(path))
    return hf, str(path)


def _batch(seed):
    """ids and next-token targets (B, T); the ids hold the pad id and a repeated token."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (B, T))
    ids[0, 2] = PAD
    ids[1, 5] = ids[0, 4]
    targets = rng.integers(0, V, (B, T))
    return ids, targets


def _ours(model, ids, targets, doc_ids=None):
    """logits (B, T, V), loss, {HF name: gradient} from npformer."""
    logits = model.forward(ids, doc_ids=doc_ids)
    loss, cache = cross_entropy_forward(logits, targets)  # mean over the B·T positions
    model.zero_grad()
    model.backward(cross_entropy_backward(np.ones((), logits.dtype), cache))
    return logits, loss, hf_state_dict(model, grads=True)


def _torch_loss(logits, targets):
    """Mean cross-entropy in the logits' dtype: mean of logsumexp(z) − z_y."""
    target_logits = logits.gather(-1, torch.from_numpy(targets)[..., None])[..., 0]  # (B, T)
    return (torch.logsumexp(logits, dim=-1) - target_logits).mean()


def _theirs(hf, ids, targets, run=None):
    """logits, loss, {checkpoint name: gradient} from transformers. ``run(hf, ids)`` gives
    the logits (B, T, V); by default one plain forward of the whole batch."""
    hf.zero_grad(set_to_none=True)
    logits = hf(torch.from_numpy(ids)).logits if run is None else run(hf, ids)
    loss = _torch_loss(logits, targets)
    loss.backward()
    grads = {hf_parameter_name(hf, name): p.grad.detach().numpy()
             for name, p in hf.named_parameters()}
    return logits.detach().numpy(), loss.detach().numpy(), grads


def _pairs(model, hf, ids, targets, doc_ids=None, run=None):
    """{what: (ours, theirs)} for logits, loss and every parameter gradient (by HF name)."""
    logits, loss, grads = _ours(model, ids, targets, doc_ids)
    ref_logits, ref_loss, ref_grads = _theirs(hf, ids, targets, run)
    assert sorted(grads) == sorted(ref_grads), "hf_state_dict names != the HF model's parameters"
    pairs = {"logits": (logits, ref_logits), "loss": (loss, ref_loss)}
    pairs.update({f"d {name}": (grads[name], ref_grads[name]) for name in ref_grads})
    return pairs


def _assert_pairs(pairs, dtype, label):
    for what, (ours, theirs) in pairs.items():
        assert ours.dtype == dtype and theirs.dtype == dtype, what
        assert_close(ours, theirs, dtype, f"{label} {what}")


def _variant(model, **changes):
    """A model of ``model.config.replace(**changes)`` holding a copy of ``model``'s weights."""
    other = DecoderLM(model.config.replace(**changes)).eval()
    ours, theirs = model.parameters(), other.parameters()
    assert sorted(ours) == sorted(theirs)
    for name, value in ours.items():
        theirs[name][...] = value
    other.hf_model_type = model.hf_model_type
    return other


def _rel_err(a, b):
    return max_errors(a, b)[1]


def _logits_pair(model, hf, seed=1):
    ids, _ = _batch(seed)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)).logits.numpy()
    return model.forward(ids), ref


# ---- parity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_float64_parity(tmp_path, case):
    with exact_float64():
        hf, directory = _checkpoint(case, np.float64, tmp_path)
        model = load_hf(directory, dtype=np.float64)
        ids, targets = _batch(1)
        pairs = _pairs(model, hf, ids, targets)
    assert len(pairs) > 2 + 10  # logits, loss and every gradient
    _assert_pairs(pairs, np.float64, case)


@pytest.mark.parametrize("case", CASES)
def test_float32_parity(tmp_path, case):
    """Stock transformers in float32 (no patch, eager attention) against
    load_hf(dir, dtype=np.float32)."""
    hf, directory = _checkpoint(case, np.float32, tmp_path)
    model = load_hf(directory, dtype=np.float32)
    ids, targets = _batch(1)
    _assert_pairs(_pairs(model, hf, ids, targets), np.float32, f"{case} float32")


def test_loaded_configs_are_the_awkward_ones(tmp_path):
    """The configs reach the model as intended (so the parity tests test what they claim)."""
    expected = {  # case: (block, rotary channels, H, K, D, layout, tied, padding_idx, scale)
        "neox-parallel": ("parallel", 4, 2, 2, 6, "half", False, None, 1.0),
        "neox-sequential": ("sequential", 4, 3, 3, 6, "half", False, None, 1.0),
        "llama-mha": ("sequential", 6, 3, 3, 6, "half", False, PAD, 1.0),
        "llama-gqa": ("sequential", 6, 6, 2, 6, "half", True, PAD, 1.0),
        "llama-mqa": ("sequential", 6, 3, 1, 6, "half", False, PAD, 1.0),
        "cohere": ("parallel", 6, 4, 2, 6, "interleaved", True, PAD, 0.5),
    }
    assert sorted(expected) == sorted(CASES)
    for case, want in expected.items():
        hf, directory = _checkpoint(case, np.float32, tmp_path / case)
        c = load_hf(directory, dtype=np.float32).config
        got = (c.block, c.rotary_dim or c.head_size, c.n_heads, c.kv_heads, c.head_size,
               c.rope_layout, c.tie_embeddings, c.padding_idx, c.logit_scale)
        assert got == want, case
        assert c.rope_theta == hf.config.rope_parameters["rope_theta"], case
    assert load_hf(str(tmp_path / "neox-parallel"), np.float32).config.parallel_norms == 2
    assert load_hf(str(tmp_path / "cohere"), np.float32).config.parallel_norms == 1


def test_float64_patches_change_precision_only():
    """Stock transformers (float32 RoPE tables, norms and Cohere rotation inside a float64
    model) and the exact_float64 reference differ by a float32-sized amount (measured 2e-8 to
    1.2e-6 relative on these configs): the patches change precision, not formulas; and they
    are needed, stock float64 misses the 1e-10 bar."""
    ids, _ = _batch(1)
    for case in CASES:
        hf = _hf_model(case, np.float64)
        with torch.no_grad():
            stock = hf(torch.from_numpy(ids)).logits.numpy()
            with exact_float64():
                patched = hf(torch.from_numpy(ids)).logits.numpy()
        difference = _rel_err(stock, patched)
        assert 1e-10 < difference < 1e-5, f"{case}: stock vs patched {difference:.3e}"


# ---- known traps ---------------------------------------------------------------------------------


def test_neox_rope_is_half_split_on_the_first_rotary_dims(tmp_path):
    """NeoX rotates the first rotary_dim = 4 of the 6 channels as halves (0,2), (1,3)
    (rotate_half); the interleaved layout (GPT-J, Cohere) or rotating all 6 channels differs."""
    with exact_float64():
        hf, directory = _checkpoint("neox-parallel", np.float64, tmp_path)
        model = load_hf(directory)
        assert (model.config.rope_layout, model.config.rotary_dim, model.config.head_size) == (
            "half", 4, 6)
        logits, ref = _logits_pair(model, hf)
        assert_close(logits, ref, np.float64, "NeoX half-split RoPE")
        for changes in (dict(rope_layout="interleaved"), dict(rotary_dim=None)):
            logits, ref = _logits_pair(_variant(model, **changes), hf)
            assert _rel_err(logits, ref) > MISMATCH, f"{changes} matched NeoX"


def test_cohere_rope_is_interleaved_and_logits_are_scaled(tmp_path):
    """Cohere's rotate_half pairs channels (0,1), (2,3), ... (unlike Llama's of the same
    name); its logits are multiplied by logit_scale. Half-split, or scale 1, does not match."""
    with exact_float64():
        hf, directory = _checkpoint("cohere", np.float64, tmp_path)
        model = load_hf(directory)
        logits, ref = _logits_pair(model, hf)
        assert_close(logits, ref, np.float64, "Cohere")
        for changes in (dict(rope_layout="half"), dict(logit_scale=1.0)):
            logits, ref = _logits_pair(_variant(model, **changes), hf)
            assert _rel_err(logits, ref) > MISMATCH, f"{changes} matched Cohere"


@pytest.mark.parametrize("case", ["llama-mha", "llama-gqa"])
def test_llama_pad_row_gets_no_gradient_from_the_lookup(tmp_path, case):
    """HF builds nn.Embedding(padding_idx=pad_token_id): the pad row's gradient from the
    lookup is zero. Untied, the whole row is exactly zero on both sides; tied, the row holds
    the head's share only. Without padding_idx our pad row would differ (the pad is in the
    input), and every other row still matches."""
    with exact_float64():
        hf, directory = _checkpoint(case, np.float64, tmp_path)
        model = load_hf(directory)
        assert model.config.padding_idx == PAD == hf.model.embed_tokens.padding_idx
        ids, targets = _batch(1)
        assert (ids == PAD).any()
        pairs = _pairs(model, hf, ids, targets)
    name = "d model.embed_tokens.weight"
    ours, theirs = pairs[name]
    assert_close(ours, theirs, np.float64, f"{case} {name}")
    if model.config.tie_embeddings:
        assert np.abs(theirs[PAD]).max() > 0
    else:
        assert not ours[PAD].any() and not theirs[PAD].any(), "the untied pad row has a gradient"
    lookup_everywhere = _variant(model, padding_idx=None)
    _, _, grads = _ours(lookup_everywhere, ids, targets)
    table = grads["model.embed_tokens.weight"]
    others = np.arange(V) != PAD
    assert_close(table[others], theirs[others], np.float64, "rows other than the pad")
    assert _rel_err(table[PAD], theirs[PAD]) > MISMATCH, "a pad row with a lookup gradient matched"


def _per_document(doc_ids):
    """run(hf, ids) for _theirs: every row of the batch cut into its documents (contiguous
    runs of one doc id), each run through HF alone at its global positions, the logits put
    back in place."""

    def run(hf, ids):
        rows = []
        for b in range(B):
            starts = [0] + [t for t in range(1, T) if doc_ids[b, t] != doc_ids[b, t - 1]] + [T]
            pieces = [hf(torch.from_numpy(ids[b:b + 1, s:e]),
                         position_ids=torch.arange(s, e)[None]).logits  # (1, e − s, V)
                      for s, e in zip(starts[:-1], starts[1:])]
            rows.append(torch.cat(pieces, dim=1))
        return torch.cat(rows, dim=0)  # (B, T, V)

    return run


def test_llama3_document_mask_equals_one_hf_run_per_document(tmp_path):
    """model.forward(ids, doc_ids) — no attention across packed documents — equals HF run on
    each document separately (logits, loss and every gradient); a one-token document, and a
    row that is a single document, included. The mask really cuts: without doc_ids the
    logits differ."""
    doc_ids = np.array([[0, 0, 0, 4, 4, 5, 7],  # documents of 3, 2, 1, 1 tokens
                        [2, 2, 2, 2, 2, 2, 2]])  # (B, T)
    with exact_float64():
        hf, directory = _checkpoint("llama-gqa", np.float64, tmp_path)
        model = load_hf(directory)
        ids, targets = _batch(1)
        pairs = _pairs(model, hf, ids, targets, doc_ids=doc_ids, run=_per_document(doc_ids))
        assert _rel_err(model.forward(ids), pairs["logits"][1]) > MISMATCH
    _assert_pairs(pairs, np.float64, "llama3 document mask")


# ---- what the loader refuses --------------------------------------------------------------------


@pytest.mark.parametrize("case, changes, field", [
    ("cohere", dict(use_qk_norm=True), "use_qk_norm"),
    ("llama-mha", dict(mlp_bias=True), "mlp_bias"),
    ("llama-gqa", dict(rope_parameters=dict(rope_type="proportional", rope_theta=500000.0,
                                            factor=2.0)), "rope_type"),
])
def test_unsupported_fields_are_clear_errors(tmp_path, case, changes, field):
    """A checkpoint we cannot reproduce is refused with a ValueError naming the field, not
    loaded into a model that computes something else."""
    _checkpoint(case, np.float32, tmp_path, **changes)
    with pytest.raises(ValueError, match=field):
        load_hf(str(tmp_path), dtype=np.float32)


@pytest.mark.parametrize("case", ["llama-mha", "cohere"])
def test_partial_rotary_factor_is_ignored_by_transformers_llama_and_cohere(tmp_path, case):
    """transformers' Llama and Cohere rotate every head channel whatever rope_parameters'
    partial_rotary_factor says (their rotary embedding builds tables for dim = head_dim and
    apply_rotary_pos_emb rotates all of q and k; only NeoX reads the factor). load_hf must
    therefore reproduce that full rotation or refuse the field — never load a model that
    rotates 4 of the 6 channels."""
    with exact_float64():
        hf, directory = _checkpoint(case, np.float64, tmp_path,
                                    rope_parameters=_rope(10000.0, partial_rotary_factor=2 / 3))
        assert hf.model.rotary_emb.inv_freq.shape[-1] == 6 // 2  # tables for all 6 channels
        try:
            model = load_hf(directory)
        except ValueError as error:
            assert "partial_rotary_factor" in str(error)
            return
        logits, ref = _logits_pair(model, hf)
    assert model.config.rotary_dim in (None, model.config.head_size), (
        f"load_hf rotates {model.config.rotary_dim} of {model.config.head_size} channels of a "
        f"{case} that transformers rotates fully (logits off by {_rel_err(logits, ref):.2e})")
    assert_close(logits, ref, np.float64, f"{case} with partial_rotary_factor")


@pytest.mark.parametrize("case", ["llama-mha", "cohere"])
def test_save_hf_never_writes_a_partial_rotary_llama_or_cohere(tmp_path, case):
    """The other direction: a model rotating 4 of its 6 channels cannot be expressed as
    transformers' Llama or Cohere (which ignore partial_rotary_factor), so save_hf under that
    model_type must refuse — or from_pretrained must compute the same logits."""
    with exact_float64():
        _, directory = _checkpoint(case, np.float64, tmp_path / "hf")
        partial = _variant(load_hf(directory), rotary_dim=4)
        try:
            save_hf(partial, str(tmp_path / "partial"))
        except ValueError:
            return
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            str(tmp_path / "partial"), dtype=torch.float64, attn_implementation="sdpa").eval()
        logits, ref = _logits_pair(partial, hf)
    assert_close(logits, ref, np.float64, f"from_pretrained(save_hf(partial-rotary {case}))")


# ---- round trip ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", CASES)
def test_round_trip(tmp_path, case, dtype):
    """load_hf → save_hf writes the very tensors of transformers' save_pretrained (names,
    dtypes, shapes, bytes; tied heads are omitted by both), and from_pretrained of that
    directory computes exactly the original model's logits (same weights, same code)."""
    with exact_float64(enabled=dtype == np.float64):
        hf, first = _checkpoint(case, dtype, tmp_path / "hf")
        ids, _ = _batch(2)
        assert_hf_round_trip(hf, first, str(tmp_path / "npformer"), CASES[case][0], dtype, ids,
                             attn_implementation=_attention(dtype))
