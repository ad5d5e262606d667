"""`npformer study softmax`: the quick study end to end, resuming a killed job, refusing
mixed settings, and the committed report (docs/study/softmax/) against its own data."""

import json
import os
import subprocess
import sys

import pytest

from npformer.study import jobs as study_jobs
from npformer.study.plan import QUICK, VARIANTS, study_job, study_plan, VARIANTS_BY_NAME
from npformer.study.report import analyse, summary_table
from npformer.study.runner import run_study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED = os.path.join(ROOT, "docs", "study", "softmax")


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    """The quick study run once through the CLI, as a user would (2 workers)."""
    out = str(tmp_path_factory.mktemp("study") / "softmax")
    completed = subprocess.run(
        [sys.executable, "-m", "npformer", "study", "softmax", "--quick", "--out", out],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return out, completed


def test_quick_study_writes_every_section_figure_and_result(quick_study):
    out, completed = quick_study
    assert "report:" in completed.stdout
    report = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    for heading in ("## 1. Positive control", "## 2. Verdicts", "## 3. Every variant",
                    "## 4. Paired effects", "## 5. What this does and does not show"):
        assert heading in report
    for variant in VARIANTS:
        assert variant.label in report
    for figure in ("over_training.png", "per_layer_inf_norm.png", "first_token_attention.png"):
        assert os.path.getsize(os.path.join(out, "figures", figure)) > 1000
    data = json.load(open(os.path.join(out, "results.json")))
    assert len(data["jobs"]) == len(VARIANTS) * QUICK.seeds
    for result in data["jobs"].values():
        assert sorted(result["measures"], key=int) == [str(s) for s in QUICK.measure_steps]
        final = result["measures"][str(QUICK.steps)]
        assert final["quantized"]["W8A8"] > 0 and final["outliers"]["max_inf_norm"] > 0
    verdicts = {v["name"]: v.get("verdict", {}).get("verdict") for v in data["analysis"]["variants"]}
    assert set(verdicts) == {v.name for v in VARIANTS}
    # the sink variant learned its sink logits; softmax₁ puts mass on its phantom key
    end = str(QUICK.steps)
    sink = data["jobs"]["softmax1-seed0"]["measures"][end]["outliers"]
    assert sink["unassigned_mass_mean"] > 0
    base = data["jobs"]["softmax-seed0"]["measures"][end]["outliers"]
    assert base["unassigned_mass_mean"] == pytest.approx(0, abs=1e-6)


def test_a_restarted_study_runs_nothing_again(quick_study):
    out, _ = quick_study
    before = {name: os.path.getmtime(os.path.join(out, "jobs", name))
              for name in os.listdir(os.path.join(out, "jobs"))}
    logs = []
    run_study(QUICK, out, workers=1, log=logs.append)
    assert "running 0" in logs[0]
    after = {name: os.path.getmtime(os.path.join(out, "jobs", name)) for name in before}
    assert after == before


def test_other_settings_are_refused(quick_study):
    out, _ = quick_study
    with pytest.raises(ValueError, match="other settings"):
        run_study(QUICK.with_steps(41), out, workers=1, log=lambda message: None)


def test_a_job_killed_between_measurements_resumes_to_the_same_numbers(tmp_path, monkeypatch):
    budget = QUICK.replace(seeds=2)
    job = study_job(VARIANTS_BY_NAME["sink"], budget, seed=1)
    whole = study_jobs.run_study_job(job, str(tmp_path / "whole"))

    real_measure, calls = study_jobs.measure, []

    def crash_on_third(*args, **kwargs):  # dies after two measurements are on disk
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real_measure(*args, **kwargs)

    monkeypatch.setattr(study_jobs, "measure", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        study_jobs.run_study_job(job, str(tmp_path / "killed"))
    monkeypatch.setattr(study_jobs, "measure", real_measure)
    saved = os.listdir(tmp_path / "killed" / "runs" / job["id"] / "measures")
    assert len(saved) == 2
    resumed = study_jobs.run_study_job(job, str(tmp_path / "killed"))
    assert resumed["measures"] == whole["measures"]
    assert resumed["history"] == whole["history"]


def test_bad_jobs_and_options_are_refused(tmp_path):
    job = study_job(VARIANTS[0], QUICK, seed=0)
    with pytest.raises(ValueError, match="measure_steps"):
        study_jobs.run_study_job(dict(job, measure_steps=[0, 50]), str(tmp_path))
    with pytest.raises(ValueError, match="lacks"):
        study_jobs.run_study_job({k: v for k, v in job.items() if k != "train"}, str(tmp_path))
    completed = subprocess.run([sys.executable, "-m", "npformer", "study", "softmax", "--seeds", "1"],
                               capture_output=True, text=True, cwd=ROOT)
    assert completed.returncode == 2 and "--seeds" in completed.stderr
    completed = subprocess.run([sys.executable, "-m", "npformer", "study", "attention"],
                               capture_output=True, text=True, cwd=ROOT)
    assert completed.returncode == 2 and "invalid choice" in completed.stderr


def test_committed_report_is_its_own_data_and_the_readme_quotes_it():
    data = json.load(open(os.path.join(COMMITTED, "results.json")))
    from npformer.study.plan import StudyBudget

    budget = StudyBudget(**{k: tuple(v) if isinstance(v, list) else v for k, v in data["budget"].items()})
    analysis = analyse(study_plan(budget), data["jobs"])
    verdicts = [v.get("verdict", {}).get("verdict") for v in analysis["variants"]]
    assert verdicts == [v.get("verdict", {}).get("verdict") for v in data["analysis"]["variants"]]
    assert analysis["control"]["passed"] == data["analysis"]["control"]["passed"]
    table = summary_table(analysis)
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert table in readme
    report = open(os.path.join(COMMITTED, "report.md"), encoding="utf-8").read()
    assert table in report
