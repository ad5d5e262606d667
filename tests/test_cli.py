"""The ``npformer`` command line, run as a user would (a subprocess of the installed package)."""

import json
import subprocess
import sys

import pytest

from npformer.cli import main


def _run(*args):
    return subprocess.run([sys.executable, "-m", "npformer", *args], capture_output=True, text=True)


def test_gradcheck_table_and_exit_code():
    result = _run("gradcheck", "linear", "softmax")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["check", "tensor"]
    assert any(line.startswith("linear ") and line.rstrip().endswith("pass") for line in lines)
    assert "0 failed" in lines[-1]


def test_gradcheck_json():
    result = _run("gradcheck", "--json", "layernorm", "cross_entropy")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert {row["name"] for row in rows} == {"layernorm", "cross_entropy"}
    for row in rows:
        assert {"name", "tensor", "max_abs_err", "max_rel_err", "passed"} <= set(row)
        assert row["passed"] is True and row["max_rel_err"] <= 1e-6
    assert {row["tensor"] for row in rows if row["name"] == "layernorm"} == {"x", "weight", "bias"}


def test_gradcheck_failure_gives_nonzero_exit(monkeypatch, capsys):
    # a registered check that fails must make the command fail
    import numpy as np

    from npformer import gradcheck

    def failing():
        return [gradcheck.compare("broken", "w", np.ones(3), np.full(3, 1.1), 1e-6, 3)]

    gradcheck.registered_checks()  # load the real registry first
    monkeypatch.setitem(gradcheck._REGISTRY, "broken", failing)
    assert main(["gradcheck", "broken"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_unknown_check_is_a_clear_error(capsys):
    assert main(["gradcheck", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown gradient check" in err and "linear" in err


def test_list():
    result = _run("gradcheck", "--list")
    assert result.returncode == 0
    assert "cross_entropy_smoothing" in result.stdout.split()


def test_presets_table_lists_the_lineage():
    from npformer.presets import preset_names

    result = _run("presets")
    assert result.returncode == 0, result.stderr
    first_words = [line.split()[0] for line in result.stdout.splitlines()[2:] if line.strip()]
    assert first_words[: len(preset_names())] == preset_names()
    assert "grouped-query" in result.stdout and "RMSNorm" in result.stdout


def test_presets_json_has_name_parent_changes_and_parameter_count():
    from npformer.models import build_model
    from npformer.presets import preset_config

    result = _run("presets", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert len(rows) == 11
    by_name = {row["name"]: row for row in rows}
    assert by_name["llama2"]["parent"] == "llama1" and by_name["transformer-2017"]["parent"] is None
    for row in rows:
        assert {"name", "parent", "changes", "n_params", "year", "forward_flops_per_token"} <= set(row)
        # the count is the built model's, not a separate estimate
        assert row["n_params"] == build_model(preset_config(row["name"])).num_parameters()
    assert by_name["llama3"]["changed_fields"] == {"document_mask": True, "rope_theta": 500000.0}


def test_gradcheck_preset_checks_every_parameter():
    from npformer.models import build_model
    from npformer.presets import tiny_config

    result = _run("gradcheck", "--json", "--preset", "palm")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    expected = set(build_model(tiny_config("palm")).parameters()) | {"input token vectors"}
    assert {row["tensor"] for row in rows} == expected
    assert all(row["passed"] and row["max_rel_err"] <= 1e-6 for row in rows)


def test_gradcheck_unknown_preset_is_a_clear_error(capsys):
    assert main(["gradcheck", "--preset", "gpt5"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'gpt5'" in err and "llama3" in err
