"""``npformer compare`` and the honest float64 Hugging Face reference behind it."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from npformer.cli import main
from npformer.interop.compare import compare_hf_dir, compare_preset
from npformer.interop.hf_float64 import exact_float64
from npformer.presets import preset_names


def _run(*args):
    return subprocess.run([sys.executable, "-m", "npformer", *args], capture_output=True, text=True)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_every_preset_matches_its_torch_twin(dtype):
    result = _run("compare", "--preset", "all", "--dtype", dtype, "--json")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = json.loads(result.stdout)
    assert {row["name"] for row in rows} == set(preset_names())
    bar = 1e-10 if dtype == "float64" else 1e-4
    for row in rows:
        assert row["passed"], row
        if row["tensor"] in ("logits", "loss"):
            assert row["max_rel_err"] <= bar, row
    # every preset compares logits, loss and at least one gradient per parameter tensor
    for name in preset_names():
        tensors = [row["tensor"] for row in rows if row["name"] == name]
        assert tensors[:2] == ["logits", "loss"] and len(tensors) > 10


def _break_rmsnorm_weight_gradient(monkeypatch) -> None:
    """Every RMSNorm weight gradient 1e-9 relative off: far below float32 noise, far above
    float64 rounding — a float64 comparison must catch it."""
    from npformer.nn import norm

    original = norm.RMSNorm.backward

    def broken(self, dy, cache):
        dx = original(self, dy, cache)
        self.grads["weight"] *= 1 + 1e-9
        return dx

    monkeypatch.setattr(norm.RMSNorm, "backward", broken)


def _failed_tensors(out: str):
    return [line.split()[1] for line in out.splitlines() if line.rstrip().endswith("FAIL")]


def test_a_wrong_gradient_fails_the_comparison(monkeypatch, capsys):
    _break_rmsnorm_weight_gradient(monkeypatch)
    assert main(["compare", "--preset", "llama2"]) == 1
    failed = _failed_tensors(capsys.readouterr().out)
    assert "model.norm.weight" in failed and "logits" not in failed


def test_bad_requests_are_clear_errors(capsys):
    assert main(["compare"]) == 2
    assert "--preset" in capsys.readouterr().err
    assert main(["compare", "--preset", "gpt5"]) == 2
    assert "unknown preset 'gpt5'" in capsys.readouterr().err
    assert main(["compare", "--hf", "/nonexistent/dir"]) == 2
    assert "not a Hugging Face checkpoint directory" in capsys.readouterr().err
    assert main(["compare", "--family", "gemma3"]) == 2
    assert "unknown --family gemma3" in capsys.readouterr().err
    assert main(["compare", "--family", "gemma", "--preset", "gpt2"]) == 2
    assert "give one of --preset NAME, --family NAME" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_every_family_example_passes(capsys, dtype):
    """``npformer compare --family all``: a save_pretrained checkpoint of every issue-16 family
    and RoPE scaling type, every tensor compared; the README's family table comes from it."""
    from npformer.interop.hf_examples import EXAMPLES

    assert main(["compare", "--family", "all", "--dtype", dtype, "--json"]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in reports} == set(EXAMPLES)
    assert all(r["passed"] for r in reports)
    # logits, loss and every gradient of each example: at least 10 tensors each
    assert all(sum(r["name"] == name for r in reports) >= 10 for name in EXAMPLES)


def test_a_family_example_mismatch_fails(monkeypatch, capsys):
    """The example path catches a broken gradient like --hf does (Gemma's (1 + w) norm)."""
    _break_rmsnorm_weight_gradient(monkeypatch)
    assert main(["compare", "--family", "gemma"]) == 1
    assert "model.norm.weight" in _failed_tensors(capsys.readouterr().out)


def _cohere_dir(tmp_path):
    config = transformers.CohereConfig(
        hidden_size=12, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=11, max_position_embeddings=16, intermediate_size=20, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, logit_scale=0.5)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    return str(tmp_path)


def test_hf_directory_in_both_dtypes(tmp_path):
    path = _cohere_dir(tmp_path)
    for dtype in ("float64", "float32"):
        reports = compare_hf_dir(path, dtype)
        assert all(r.passed for r in reports), [r for r in reports if not r.passed]
        assert {r.tensor for r in reports} >= {"logits", "loss", "model.embed_tokens.weight"}


def test_exact_float64_changes_precision_not_formulas(tmp_path):
    # stock transformers (float32 islands) and the patched reference agree to float32 precision,
    # and the patches are gone after the block
    from transformers.models.cohere import modeling_cohere

    path = _cohere_dir(tmp_path)
    stock_rotary = modeling_cohere.apply_rotary_pos_emb
    ids = torch.as_tensor(np.random.default_rng(0).integers(0, 11, (2, 7)))
    stock = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)(ids).logits
    with exact_float64():
        assert modeling_cohere.apply_rotary_pos_emb is not stock_rotary
        patched = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)(ids).logits
    assert modeling_cohere.apply_rotary_pos_emb is stock_rotary
    difference = float((stock - patched).abs().max().detach() / patched.abs().max().detach())
    assert 1e-12 < difference < 1e-5  # a float32-sized difference, not a different formula


def test_torch_reference_presets_fail_when_broken(monkeypatch):
    # the in-package torch reference is independent: breaking npformer's window shows up
    from npformer.models import blocks

    original = blocks.make_attention

    def wider(config, layer, rng, **kw):
        attention = original(config, layer, rng, **kw)
        if attention.core_options["window"] is not None:
            attention.core_options["window"] += 1
        return attention

    monkeypatch.setattr(blocks, "make_attention", wider)
    reports = compare_preset("gpt3")
    assert not all(r.passed for r in reports)
