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
