"""``npformer gradcheck --preset``: every parameter of every preset, end to end, in float64."""

import numpy as np
import pytest

from helpers import FD_RTOL, assert_gradcheck_passes
from npformer.checks.models import check_preset
from npformer.models import build_model
from npformer.presets import preset_names, tiny_config


@pytest.mark.parametrize("name", preset_names())
def test_every_parameter_of_the_preset_passes(name):
    # check_preset(name), run once per session: explain.run_check memoises it (seeded, so a
    # second run gives the same reports), and `npformer explain` runs the same preset checks
    # for the lineage pages (tests/test_explain.py). The broken-backward test below calls
    # check_preset directly, so a cached result never hides a change.
    from npformer import explain

    reports = explain.run_check("preset", name).reports
    assert_gradcheck_passes(reports)
    checked = {r.tensor for r in reports}
    model = build_model(tiny_config(name))
    assert set(model.parameters()) <= checked  # every parameter tensor, none skipped
    if model.config.architecture == "decoder":
        assert "input token vectors" in checked


def test_the_check_catches_a_wrong_gradient(monkeypatch):
    # break one backward by 1% (the norm's weight gradient): the preset check must fail there
    from npformer.nn import norm

    original = norm.RMSNorm.backward

    def broken(self, dy, cache):
        dx = original(self, dy, cache)
        self.grads["weight"] *= 1.01
        return dx

    monkeypatch.setattr(norm.RMSNorm, "backward", broken)
    reports = check_preset("llama2")
    failed = {r.tensor for r in reports if not r.passed}
    assert "final_norm.weight" in failed
    assert all(r.max_rel_err > FD_RTOL for r in reports if r.tensor in failed)
    assert not any(r.tensor.endswith("q_proj.weight") for r in reports if not r.passed)


def test_dropout_is_inside_the_check():
    # gpt2 keeps its dropout 0.1 in the check: the model is in training mode and masks differ
    # between two draws, so the check only passes because every evaluation reuses one mask
    config = tiny_config("gpt2")
    assert config.dropout > 0
    model = build_model(config).train()
    ids = np.arange(6).reshape(1, 6)
    assert not np.allclose(model.forward(ids), model.forward(ids))
