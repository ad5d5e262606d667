"""benchmarks/train_step.py runs and writes what it promises (no timing asserts).

One ``--quick`` run at a tiny size (C = 32, 1 layer, B = 2, T = 16) of every preset in a
child process (its own threads, torch imported before numba, as the script requires), then:
the JSON has its settings, one floor per configuration and the rows npformer / torch /
floor per configuration, each with finite positive times, tokens/s and ratios, and the
npformer rows a profile breakdown in percentages summing to 100. The peak-RSS probe (a
child process per contender) is run once for each contender on its own.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "train_step.py"
PRESETS = ("gpt2", "llama3", "transformer-2017")
CONTENDERS = ("npformer", "torch", "floor")


def run_script(*args, timeout=240):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=str(ROOT))


def finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "train_step.json"
    done = run_script("--quick", "--sizes", "tiny", "--repeats", "2", "--json", str(path))
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(path.read_text()), done.stdout


def test_quick_run_writes_every_configuration_and_contender(quick_report):
    report, stdout = quick_report
    settings = report["settings"]
    for key in ("cpu", "threads", "repeats", "presets", "sizes", "contenders", "blas",
                "numpy", "numba", "torch", "layer_impl_field"):
        assert key in settings, key
    assert settings["threads"] == 2 and settings["repeats"] == 2 and settings["quick"] is True
    assert settings["cpu"] and settings["presets"] == list(PRESETS)
    assert [(f["preset"], f["size"]) for f in report["floors"]] == [(p, "tiny") for p in PRESETS]
    for floor in report["floors"]:
        assert isinstance(floor["products"], int) and floor["products"] > 0
        assert finite_positive(floor["gflop"])
    rows = report["rows"]
    assert [(r["preset"], r["contender"]) for r in rows] == [
        (p, c) for p in PRESETS for c in CONTENDERS]
    for r in rows:
        where = f"{r['preset']} {r['contender']}"
        assert (r["batch_size"], r["seq_len"], r["d_model"], r["n_layers"]) == (2, 16, 32, 1), where
        for key in ("median_ms", "min_ms", "tokens_per_s", "ratio_to_torch", "min_ratio_to_torch",
                    "ratio_to_floor", "floor_gflops_per_s"):
            assert finite_positive(r[key]), (where, key, r[key])
        assert len(r["times_ms"]) == 2 and all(finite_positive(t) for t in r["times_ms"]), where
        assert r["min_ms"] <= r["median_ms"], where
        assert r["peak_rss_mib"] is None and r["rss_rise_mib"] is None, where  # --quick: no probes
    for r in rows:
        if r["contender"] == "torch":
            assert r["ratio_to_torch"] == 1.0
        if r["contender"] == "floor":
            assert r["ratio_to_floor"] == 1.0
    assert "all configurations:" in stdout and "% of profiled time" in stdout


def test_quick_run_profiles_the_npformer_step_into_categories(quick_report):
    report, _ = quick_report
    for r in report["rows"]:
        if r["contender"] != "npformer":
            assert r["breakdown_pct"] is None
            continue
        shares = r["breakdown_pct"]
        assert {"linear", "norm", "activation", "attention", "cross-entropy", "optimizer",
                "clip", "other"} <= set(shares), r["preset"]
        assert all(math.isfinite(v) and v >= 0 for v in shares.values()), shares
        assert abs(sum(shares.values()) - 100) < 1.0, shares
        assert shares["linear"] > 0 and shares["optimizer"] > 0, shares  # every step has both


@pytest.mark.parametrize("contender", ["npformer", "torch"])
def test_memory_probe_reports_a_peak_above_its_baseline(contender):
    done = run_script("--memory-probe", "gpt2", "tiny", contender, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert finite_positive(report["baseline_rss_mib"]) and finite_positive(report["peak_rss_mib"])
    assert report["peak_rss_mib"] >= report["baseline_rss_mib"]


def test_layer_impl_flags_follow_the_config_field(tmp_path):
    """--compare-impls runs npformer[numba] and npformer[numpy] where ModelConfig has
    ``layer_impl``; elsewhere it stops with a message naming the missing field."""
    from npformer.config import config_field_names

    path = tmp_path / "impls.json"
    done = run_script("--quick", "--sizes", "tiny", "--presets", "gpt2", "--repeats", "1",
                      "--no-torch", "--profile-steps", "0", "--compare-impls", "--json", str(path))
    if "layer_impl" in config_field_names():
        assert done.returncode == 0, done.stderr[-2000:]
        rows = json.loads(path.read_text())["rows"]
        assert [(r["contender"], r["layer_impl"]) for r in rows] == [
            ("npformer[numba]", "numba"), ("npformer[numpy]", "numpy"), ("floor", None)]
    else:
        assert done.returncode != 0 and not path.exists()
        assert "no field 'layer_impl'" in done.stderr, done.stderr[-2000:]
