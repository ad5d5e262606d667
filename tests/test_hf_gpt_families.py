"""Hugging Face parity of the GPT families — openai-gpt, gpt2, gpt_neo, gptj — through
``npformer.interop.load_hf``.

The contract under test, per family: a ``transformers`` model with random, non-default weights
→ ``save_pretrained(dir)`` → ``load_hf(dir)`` → forward, mean cross-entropy, backward →
``hf_state_dict(model, grads=True)`` equals the Hugging Face model's ``.grad`` for EVERY
parameter, tensor by tensor (and the logits and the loss): float64 within 1e-10 relative,
float32 within 1e-4 relative + 1e-5 absolute (tests/helpers.py). Then the traps each family
sets for a reimplementation, and the round trip save_hf → from_pretrained.

The configs are deliberately awkward: B = 2, T = 7 (odd), head sizes 6 and 5 (not powers of
two), a GPT-2 without 1/√D scaling and with the exact-erf GeLU, a GPT-Neo whose local layers
(window 3 < T) alternate with global ones, a GPT-J rotating only 4 of its 5 head channels and
whose untied head has a bias, a pad id that appears in the input (none of these families gives
it a padding row, so its embedding row must get a gradient), repeated tokens.

Float64 references. transformers 5 computes some pieces of these models in float32 even when
the model is float64, which caps stock parity near 1e-7 (measured on these configs: GPT-Neo
logits 1.4e-7 and worst gradient 5.5e-7 relative; GPT-J 6.3e-8 and 2.4e-7). Rather than
loosen 1e-10 we make the reference honest with patches that change only the precision of a
computation, never its formula. They are patches 1-3 of :mod:`npformer.interop.hf_float64`
(the same ones ``npformer compare`` uses), applied by its ``exact_float64()`` context manager
(the ``float64_reference`` fixture), which restores the stock functions after each test:

  1. GPT-Neo ``GPTNeoSelfAttention._attn`` casts query and key to float32 ("Keep the
     attention weights computation in fp32") → the same function's code with ``torch.float32``
     read as float64 (as tests/test_mha_module.py does).
  2. GPT-J ``eager_attention_forward`` casts query and key to float32 → the same code with
     ``torch.float32`` read as float64 (GPTJAttention looks the function up in its module at
     call time, so patching the module attribute reaches it).
  3. GPT-J ``create_sinusoidal_positions`` builds the [sin | cos] RoPE table in float32 (an int64
     arange divided by dim is float32, and so are the angles) → the same
     formula in float64. It is called when the model is built and again by ``_init_weights``
     (the table is a non-persistent buffer), so it is patched before either.
  Either GPT-J patch alone still leaves ~1e-8 (table) or ~5e-8 (attention) relative error.
  test_float64_patches_change_precision_not_formulas checks that the patched models agree
  with stock ones to float32 precision, i.e. that they compute the same functions.
GPT-1 and GPT-2 need no patch: their eager paths stay in the model's dtype (GPT-1's masked
scores are a finite −1e4 offset whose exp underflows to exactly 0 in float64). The loss is
never Hugging Face's built-in one (``ForCausalLMLoss`` upcasts logits to float32): the test
computes mean cross-entropy itself in the logits' dtype on the torch side, and with
npformer.functional.cross_entropy_forward / _backward on ours.

Known traps, one test each: GPT-1's afn "gelu" is the tanh approximation (exact erf does not
match); GPT-Neo has no 1/√D scaling and its local window is the w keys i − w < j ≤ i (w ± 1
does not match); GPT-J's RoPE is interleaved on the first rotary_dim channels (half-split, or
another rotary_dim, does not match).
"""

import json

import numpy as np
import pytest
import torch
import transformers
from transformers.models.gptj import modeling_gptj

from helpers import assert_close, assert_hf_round_trip, max_errors
from npformer.functional import cross_entropy_backward, cross_entropy_forward
from npformer.functional.attention_mask import attention_mask
from npformer.interop import hf_state_dict, load_hf
from npformer.interop.hf_float64 import exact_float64
from npformer.models import DecoderLM

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

B, T = 2, 7  # batch 2, odd sequence length
PAD = 1  # pad_token_id of every config; it appears in the input ids (see _batch)
MISMATCH = 1e-6  # a trap variant must miss the reference by this much (10⁴ × the tolerance)

# (model_type, transformers config fields). Head sizes: 12/2 = 6 and 15/3 = 5.
CASES = {
    # GPT-1: post-LN, afn "gelu" (tanh form), MLP width fixed at 4C, tied head; default
    # dropouts 0.1 (load_hf must give an eval-mode model, as hf.eval() does)
    "openai-gpt": ("openai-gpt", dict(vocab_size=23, n_embd=12, n_head=2, n_layer=2,
                                      n_positions=16, afn="gelu")),
    # GPT-2: pre-LN, final LN, tied head, gelu_new (tanh form), an MLP width that is not 4C
    "gpt2": ("gpt2", dict(vocab_size=23, n_embd=12, n_head=2, n_layer=2, n_positions=16,
                          n_inner=20, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    # GPT-2 without the 1/sqrt(D) score scaling, exact-erf GeLU, D = 5
    "gpt2-unscaled": ("gpt2", dict(vocab_size=21, n_embd=15, n_head=3, n_layer=2,
                                   n_positions=16, scale_attn_weights=False,
                                   activation_function="gelu", resid_pdrop=0.0,
                                   embd_pdrop=0.0, attn_pdrop=0.0)),
    # GPT-Neo: local (window 3 < T) and global layers alternating, no 1/sqrt(D), D = 5
    "gpt_neo": ("gpt_neo", dict(vocab_size=23, hidden_size=15, num_heads=3, num_layers=4,
                                max_position_embeddings=16, window_size=3,
                                attention_types=[[["local", "global"], 2]], intermediate_size=22,
                                resid_dropout=0.0, embed_dropout=0.0, attention_dropout=0.0)),
    # GPT-J: parallel block, one LN, interleaved RoPE on 4 of the 5 head channels, untied
    # head with a bias
    "gptj": ("gptj", dict(vocab_size=23, n_embd=15, n_head=3, n_layer=2, n_positions=16,
                          rotary_dim=4, n_inner=22, resid_pdrop=0.0, embd_pdrop=0.0,
                          attn_pdrop=0.0)),
}
TORCH_DTYPES = {np.dtype(np.float64): torch.float64, np.dtype(np.float32): torch.float32}


# ---- honest float64 references (see the module docstring) ------------------------------------


@pytest.fixture
def float64_reference():
    with exact_float64():
        yield


# ---- building, running, comparing ---------------------------------------------------------------


def _hf_config(case):
    model_type, fields = CASES[case]
    # explicit special ids inside the tiny vocabulary (else transformers warns about them)
    return transformers.AutoConfig.for_model(model_type, bos_token_id=0, eos_token_id=0,
                                             pad_token_id=PAD, **fields)


def _hf_model(case, dtype, seed=0):
    """A transformers model (eager attention) in ``dtype`` with random weights: LayerNorm
    weights away from 1, every bias non-zero, every matrix and table off-centre. The values
    are drawn in float64 and rounded once, so float32 and float64 models of one seed agree."""
    hf = transformers.AutoModelForCausalLM.from_config(_hf_config(case),
                                                       attn_implementation="eager")
    hf = hf.to(TORCH_DTYPES[np.dtype(dtype)]).eval()
    rng = np.random.default_rng(seed)
    norms = {f"{name}.weight" for name, module in hf.named_modules()
             if isinstance(module, torch.nn.LayerNorm)}
    with torch.no_grad():
        for name, p in hf.named_parameters():  # a tied table appears once
            z = rng.standard_normal(tuple(p.shape))
            value = 1.0 + 0.3 * z if name in norms else 0.35 * z + 0.05
            p.copy_(torch.from_numpy(value))
    return hf


def _checkpoint(case, dtype, path, seed=0):
    """(HF model, its save_pretrained directory)."""
    hf = _hf_model(case, dtype, seed)
    hf.save_pretrained(str(path))
    return hf, str(path)


def _batch(vocab, seed):
    """ids and next-token targets (B, T); the ids hold the pad id and a repeated token."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (B, T))
    ids[0, 2] = PAD
    ids[1, 5] = ids[0, 4]
    targets = rng.integers(0, vocab, (B, T))
    return ids, targets


def _ours(model, ids, targets):
    """logits (B, T, V), loss, {HF name: gradient} from npformer."""
    logits = model.forward(ids)
    loss, cache = cross_entropy_forward(logits, targets)  # mean over the B·T positions
    model.zero_grad()
    model.backward(cross_entropy_backward(np.ones((), logits.dtype), cache))
    return logits, loss, hf_state_dict(model, grads=True)


def _theirs(hf, ids, targets):
    """logits, loss, {name: gradient} from transformers; mean cross-entropy computed here in
    the logits' dtype (not transformers' loss, which upcasts to float32)."""
    hf.zero_grad(set_to_none=True)
    logits = hf(torch.from_numpy(ids)).logits  # (B, T, V)
    target_logits = logits.gather(-1, torch.from_numpy(targets)[..., None])[..., 0]  # (B, T)
    loss = (torch.logsumexp(logits, dim=-1) - target_logits).mean()  # −log p_y, averaged
    loss.backward()
    grads = {name: p.grad.detach().numpy() for name, p in hf.named_parameters()}
    return logits.detach().numpy(), loss.detach().numpy(), grads


def _parity(case, dtype, path, seed=0):
    """Both sides on one checkpoint; returns {what: (ours, theirs)} for logits, loss and
    every parameter gradient (by HF name)."""
    hf, directory = _checkpoint(case, dtype, path, seed)
    model = load_hf(directory, dtype=dtype)
    ids, targets = _batch(hf.config.vocab_size, seed + 1)
    logits, loss, grads = _ours(model, ids, targets)
    ref_logits, ref_loss, ref_grads = _theirs(hf, ids, targets)
    assert sorted(grads) == sorted(ref_grads), "hf_state_dict names != the HF model's parameters"
    pairs = {"logits": (logits, ref_logits), "loss": (loss, ref_loss)}
    pairs.update({f"d {name}": (grads[name], ref_grads[name]) for name in ref_grads})
    return pairs


def _variant(model, **changes):
    """A model of ``model.config.replace(**changes)`` holding a copy of ``model``'s weights."""
    other = DecoderLM(model.config.replace(**changes)).eval()
    ours, theirs = model.parameters(), other.parameters()
    assert sorted(ours) == sorted(theirs)
    for name, value in ours.items():
        theirs[name][...] = value
    return other


def _rel_err(a, b):
    return max_errors(a, b)[1]


# ---- parity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_float64_parity(tmp_path, float64_reference, case):
    pairs = _parity(case, np.float64, tmp_path)
    assert len(pairs) > 2 + 10  # logits, loss and every gradient
    for what, (ours, theirs) in pairs.items():
        assert ours.dtype == np.float64 and theirs.dtype == np.float64, what
        assert_close(ours, theirs, np.float64, f"{case} {what}")


@pytest.mark.parametrize("case", CASES)
def test_float32_parity(tmp_path, case):
    """Stock transformers in float32 (no patch) against load_hf(dir, dtype=np.float32)."""
    pairs = _parity(case, np.float32, tmp_path)
    for what, (ours, theirs) in pairs.items():
        assert ours.dtype == np.float32 and theirs.dtype == np.float32, what
        assert_close(ours, theirs, np.float32, f"{case} float32 {what}")


def test_float64_patches_change_precision_not_formulas():
    """The patched float64 references compute the stock functions: stock and patched logits
    agree to float32 precision, and the float64 RoPE table rounds to stock's float32 table."""
    stock = {}
    for case in ("gpt_neo", "gptj"):
        hf = _hf_model(case, np.float64)
        ids, _ = _batch(hf.config.vocab_size, 1)
        with torch.no_grad():
            stock[case] = (ids, hf(torch.from_numpy(ids)).logits.numpy())
    table = modeling_gptj.create_sinusoidal_positions(16, 4)
    assert table.dtype == torch.float32
    with exact_float64():
        table64 = modeling_gptj.create_sinusoidal_positions(16, 4)
        assert table64.dtype == torch.float64
        assert_close(table64.float(), table, np.float32, "gptj table")
        for case, (ids, logits) in stock.items():
            hf = _hf_model(case, np.float64)
            with torch.no_grad():
                patched = hf(torch.from_numpy(ids)).logits.numpy()
            assert_close(patched, logits, np.float32, f"{case} patched vs stock")


# ---- known traps ---------------------------------------------------------------------------------


def _logits_pair(model, hf, seed=1):
    ids, _ = _batch(hf.config.vocab_size, seed)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)).logits.numpy()
    return model.forward(ids), ref


def test_gpt1_gelu_is_the_tanh_approximation(tmp_path, monkeypatch):
    """openai-gpt's own ACT_FNS maps afn "gelu" to gelu_new, the tanh form (not ACT2FN's
    exact erf "gelu"). With HF's MLPs switched to exact erf, our tanh model no longer matches,
    and our model switched to exact erf matches that instead."""
    hf, directory = _checkpoint("openai-gpt", np.float64, tmp_path)
    model = load_hf(directory)
    assert json.loads((tmp_path / "config.json").read_text())["afn"] == "gelu"
    assert model.config.ffn == "gelu_tanh"
    erf = _variant(model, ffn="gelu")
    logits, ref = _logits_pair(model, hf)
    assert_close(logits, ref, np.float64, "tanh GeLU vs stock GPT-1")
    logits, ref = _logits_pair(erf, hf)
    assert _rel_err(logits, ref) > MISMATCH, "exact-erf GeLU matched stock GPT-1"
    for block in hf.transformer.h:  # the exact erf GeLU in every MLP
        monkeypatch.setattr(block.mlp, "act", torch.nn.GELU(approximate="none"))
    logits, ref = _logits_pair(model, hf)
    assert _rel_err(logits, ref) > MISMATCH, "tanh GeLU matched an exact-erf GPT-1"
    logits, ref = _logits_pair(erf, hf)
    assert_close(logits, ref, np.float64, "erf GeLU vs GPT-1 with erf MLPs")


def test_gpt_neo_has_no_attention_scaling(tmp_path, float64_reference):
    hf, directory = _checkpoint("gpt_neo", np.float64, tmp_path)
    model = load_hf(directory)
    assert model.config.attention_scale == 1.0
    logits, ref = _logits_pair(model, hf)
    assert_close(logits, ref, np.float64, "GPT-Neo unscaled scores")
    scaled = _variant(model, attention_scale=None)  # the usual 1/sqrt(D)
    logits, ref = _logits_pair(scaled, hf)
    assert _rel_err(logits, ref) > MISMATCH, "1/sqrt(D) scaling matched GPT-Neo"


def test_gpt_neo_local_window_is_the_last_w_keys(tmp_path, float64_reference):
    """Local layers see keys i − w < j ≤ i (w keys, the query's own included): HF's mask
    buffers are that band (global layers plain causal), and a window one smaller or one larger
    does not reproduce the model."""
    hf, directory = _checkpoint("gpt_neo", np.float64, tmp_path)
    model = load_hf(directory)
    w = hf.config.window_size
    assert w + 1 < T  # both w − 1 and w + 1 still cut some key off
    assert model.config.attention_pattern == ("local", "dense", "local", "dense")
    assert [model.config.layer_window(l) for l in range(4)] == [w, None, w, None]
    for l, block in enumerate(hf.transformer.h):
        band = block.attn.attention.bias[0, 0, :T, :T].numpy()  # (T, T) bool, True = visible
        expected = attention_mask(1, T, T, causal=True, window=model.config.layer_window(l))[0, 0]
        i, j = np.indices((T, T))
        assert np.array_equal(band, (j <= i) & ((j > i - w) if l % 2 == 0 else True)), l
        assert np.array_equal(band, expected), l
    logits, ref = _logits_pair(model, hf)
    assert_close(logits, ref, np.float64, f"GPT-Neo window {w}")
    for other in (w - 1, w + 1):
        logits, ref = _logits_pair(_variant(model, window=other), hf)
        assert _rel_err(logits, ref) > MISMATCH, f"window {other} matched GPT-Neo's window {w}"


def test_gptj_rope_is_interleaved_on_the_first_rotary_dims(tmp_path, float64_reference):
    """GPT-J rotates pairs (0,1), (2,3) of the first rotary_dim channels of q and k
    (rotate_every_two); the half-split layout (NeoX, Llama) or another rotary_dim differs."""
    hf, directory = _checkpoint("gptj", np.float64, tmp_path)
    model = load_hf(directory)
    assert (model.config.positions, model.config.rope_layout) == ("rope", "interleaved")
    assert (model.config.rotary_dim, model.config.head_size) == (4, 5)
    logits, ref = _logits_pair(model, hf)
    assert_close(logits, ref, np.float64, "GPT-J interleaved RoPE")
    for changes in (dict(rope_layout="half"), dict(rotary_dim=2)):
        logits, ref = _logits_pair(_variant(model, **changes), hf)
        assert _rel_err(logits, ref) > MISMATCH, f"{changes} matched GPT-J"


# ---- round trip ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", CASES)
def test_round_trip(tmp_path, case, dtype):
    """load_hf → save_hf writes the same tensors (names, dtypes, shapes, values) as
    transformers' save_pretrained, and transformers' from_pretrained of that directory
    computes exactly the logits of the original model (same weights, same code)."""
    # (float64 only: the patched functions would compute float32 models in float64)
    with exact_float64(dtype == np.float64):
        hf, first = _checkpoint(case, dtype, tmp_path / "hf")
        ids, _ = _batch(hf.config.vocab_size, 2)
        assert_hf_round_trip(hf, first, str(tmp_path / "npformer"), CASES[case][0], dtype, ids)
