"""``npformer tour`` end to end: the --quick report has every section, a killed tour resumes
without redoing finished runs, other settings are refused, and Dask gives the local numbers."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from npformer.cli import main
from npformer.tour import runner
from npformer.tour.plan import COMPARISONS, QUICK, tour_plan
from npformer.tour.runner import execute

# the numbers a result must reproduce exactly (wall-clock fields excluded)
TIMED = ("seconds", "tokens_per_s")


def _deterministic(result):
    """A train result without its wall-clock fields."""
    return {k: v for k, v in result.items() if k not in TIMED}


def _train_jobs(budget, only, count=None):
    jobs = [j for j in tour_plan(budget, only=only).jobs if j["kind"] == "train"]
    return jobs if count is None else jobs[:count]


def test_quick_tour_writes_a_report_with_every_section(tmp_path, capsys):
    out = tmp_path / "tour"
    assert main(["tour", "--quick", "--out", str(out), "--workers", "2"]) == 0
    report = (out / "report.md").read_text()
    for comparison in COMPARISONS:
        assert comparison.title in report, comparison.name
    assert "What this budget can and cannot show" in report
    results = json.loads((out / "results.json").read_text())
    plan = tour_plan(QUICK)
    assert set(results["jobs"]) == {j["id"] for j in plan.jobs}
    assert [c["name"] for c in results["comparisons"]] == [c.name for c in COMPARISONS]
    assert results["meta"]["command"] == f"npformer tour --quick --out {out}"
    for link in (line.split("](", 1)[1].split(")", 1)[0] for line in report.splitlines()
                 if "![" in line):
        with open(out / link, "rb") as figure:
            assert figure.read(8) == b"\x89PNG\r\n\x1a\n", link
    assert len(list((out / "jobs").glob("*.json"))) == len(plan.jobs)
    # started again: everything is found finished, nothing is trained
    capsys.readouterr()
    assert main(["tour", "--quick", "--out", str(out), "--workers", "2"]) == 0
    assert f"{len(plan.jobs)} already finished" in capsys.readouterr().out


def test_a_killed_tour_resumes_without_redoing_finished_runs(tmp_path):
    """kill -9 while the second job trains; the restart keeps the first job's result file
    untouched and ends with the numbers of an uninterrupted tour."""
    only = ["document-mask"]
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    command = [sys.executable, "-m", "npformer", "tour", "--quick", "--only", *only,
               "--workers", "1", "--steps", "60", "--out", str(killed)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONPATH": os.getcwd()})
    jobs_dir = killed / "jobs"
    deadline = time.time() + 120
    while time.time() < deadline and not (jobs_dir.exists() and len(list(jobs_dir.glob("*.json"))) >= 1):
        time.sleep(0.05)
    first = sorted(jobs_dir.glob("*.json"))
    assert first, "no job finished in time"
    time.sleep(0.5)  # into the next job's training
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in jobs_dir.glob("*.json")}
    total = len(tour_plan(QUICK.replace(steps=60), only=only).jobs)
    assert 1 <= len(finished) < total

    budget = QUICK.replace(steps=60)
    log = []
    runner.run_tour(budget, str(killed), only=only, workers=1, log=log.append)
    assert f"{len(finished)} already finished" in log[0]
    for name, (mtime, content) in finished.items():  # not redone
        path = jobs_dir / name
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == content, name
    runner.run_tour(budget, str(straight), only=only, workers=1, log=lambda *_: None)
    for job in tour_plan(budget, only=only).jobs:
        if job["kind"] != "train":
            continue
        a = json.loads((killed / "jobs" / f"{job['id']}.json").read_text())
        b = json.loads((straight / "jobs" / f"{job['id']}.json").read_text())
        assert _deterministic(a) == _deterministic(b), job["id"]


def test_results_of_other_settings_are_refused(tmp_path):
    jobs = _train_jobs(QUICK.replace(steps=4, seeds=2), ["norm"], count=1)
    execute(jobs, str(tmp_path), log=lambda *_: None)
    other = _train_jobs(QUICK.replace(steps=5, seeds=2), ["norm"], count=1)
    with pytest.raises(ValueError, match=r"other settings \(train.checkpoint_interval, train.steps differ.*another --out.*--overwrite"):
        execute(other, str(tmp_path), log=lambda *_: None)


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    assert main(["tour", "--quick", "--only", "mlp", "--out", str(tmp_path / "a")]) == 2
    assert "unknown comparison" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["tour", "--quick", "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tour", "--seeds", "1"])  # a paired interval needs 2 seeds
    monkeypatch.setattr(runner, "CONNECT_TIMEOUT", "1s")
    assert main(["tour", "--quick", "--only", "norm", "--scheduler", "tcp://127.0.0.1:9",
                 "--out", str(tmp_path / "b")]) == 2
    assert "cannot connect to a Dask scheduler" in capsys.readouterr().err


def test_dask_gives_the_local_numbers(tmp_path):
    """A two-run tour (float64) on a dask.distributed LocalCluster of 2 single-threaded worker
    processes: the same results, bit for bit, as the local executor's."""
    distributed = pytest.importorskip("distributed")  # the test extra installs it; CI has it
    jobs = _train_jobs(QUICK.replace(seeds=1, dtype="float64", steps=12), ["norm"])
    assert len(jobs) == 2
    local = execute(jobs, str(tmp_path / "local"), workers=2, log=lambda *_: None)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        remote = execute(jobs, str(tmp_path / "dask"), scheduler=cluster.scheduler_address,
                         log=lambda *_: None)
    for job in jobs:
        assert _deterministic(local[job["id"]]) == _deterministic(remote[job["id"]]), job["id"]
    assert local[jobs[0]["id"]]["final_val_loss"] != local[jobs[1]["id"]]["final_val_loss"]
