"""Running a tour: its jobs in local worker processes or on a Dask cluster, resumable.

    npformer tour [--quick] [--seeds N] [--steps N] [--out DIR] [--only NAME ...]
                  [--workers N] [--scheduler tcp://HOST:8786] [--overwrite]

A job is a JSON dict (``plan.variant_job`` / ``plan.timing_job``) and its result a JSON dict
(``jobs.run_job``), so the two executors run exactly the same thing:

- local (the default): ``--workers`` processes (default: the number of cores), started with
  ``spawn`` (a forked child would inherit numba's and BLAS's thread pools mid-state). Each
  job holds its own thread count (``Budget.threads``, 1): two workers on two cores run two
  single-threaded jobs, never 2 × 2 threads fighting for the cores. ``--workers 1`` runs
  the jobs in this process.
- Dask distributed (``--scheduler ADDRESS``, the ``cluster`` extra): every job is one
  ``client.submit(run_job, job, out_dir)`` on the cluster's workers, which need npformer
  installed. The results come back to this process, which writes them; the workers'
  training checkpoints go to ``OUT/runs/`` as the workers see that path (on a shared file
  system a killed job resumes from its checkpoint; otherwise it restarts).

Resume: each finished job's result is written atomically to ``OUT/jobs/<id>.json`` the
moment it arrives. A tour started again with the same settings loads those results and runs
only the missing jobs; a job killed mid-training resumes from its last checkpoint in
``OUT/runs/<id>/`` (the trainer's resume is exact, so the numbers equal an uninterrupted
run's). A result computed with other settings (another --steps, --quick, ...) is refused
with the way out (another --out, or --overwrite), never mixed into the report.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Callable, Dict, List, Optional, Sequence

from .. import checkpoint as ckpt
from .._machine import cpu_model
from .jobs import run_job
from .plan import Budget, tour_plan

JOBS_DIR, RUNS_DIR = "jobs", "runs"
SESSIONS = "sessions.json"  # every invocation that ran jobs: when, how long, on what
CONNECT_TIMEOUT = "20s"  # how long --scheduler waits for the Dask scheduler to answer
REPORT_FILES = ("report.md", "results.json", "figures")  # what report.write_report writes
TOUR_FILES = (JOBS_DIR, RUNS_DIR, SESSIONS) + REPORT_FILES


class JobFailed(RuntimeError):
    """A job raised (a bug, or the machine refused): the tour stops; finished jobs are kept."""


def _as_json(value):
    """The value as it reads back from a JSON file (tuples become lists)."""
    return json.loads(json.dumps(value))


def result_path(out_dir: str, job_id: str) -> str:
    return os.path.join(out_dir, JOBS_DIR, f"{job_id}.json")


def finished_results(jobs: Sequence[dict], out_dir: str) -> Dict[str, dict]:
    """The results already in ``OUT/jobs/`` for these jobs. A result whose job differs from the
    planned one (other settings) is refused by name, as is a file that is not a result."""
    done = {}
    for job in jobs:
        path = result_path(out_dir, job["id"])
        if not os.path.exists(path):
            continue
        result = ckpt.require_keys(ckpt.read_json(path), dict(id=str, kind=str, job=dict), path)
        if result["job"] != _as_json(job):
            planned, saved = _as_json(job), result["job"]
            changed = []
            for key in sorted(set(planned) | set(saved)):
                a, b = planned.get(key), saved.get(key)
                if isinstance(a, dict) and isinstance(b, dict):  # train.steps, not just train
                    changed += [f"{key}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
                elif a != b:
                    changed.append(key)
            raise ValueError(f"{path} was computed with other settings ({', '.join(changed)} "
                             "differ from this tour's); finish that tour with its own options, "
                             "or pass another --out, or --overwrite to start this one afresh")
        done[job["id"]] = result
    return done


def clear_tour(out_dir: str) -> None:
    """--overwrite: remove what a tour writes in ``out_dir`` (and only that)."""
    if not os.path.isdir(out_dir):
        return
    for name in TOUR_FILES:
        path = os.path.join(out_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.unlink(path)


def _describe(result: dict) -> str:
    if result["kind"] == "timing":
        return "timed"
    if result.get("diverged"):
        return f"diverged at step {result.get('diverged_at_step')}"
    return f"validation loss {result['final_val_loss']:.4f}"


def _run_local(todo: List[dict], out_dir: str, workers: int, record: Callable[[dict], None],
               run: Callable[[dict, str], dict] = run_job) -> None:
    if workers == 1:  # in this process: simplest to debug, and what a single core does best
        for job in todo:
            record(run(job, out_dir))
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        pending = {pool.submit(run, job, out_dir): job for job in todo}
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    job = pending.pop(future)
                    try:
                        result = future.result()
                    except Exception as error:
                        raise JobFailed(f"job {job['id']} failed: {type(error).__name__}: "
                                        f"{error}") from error
                    record(result)
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def _run_dask(todo: List[dict], out_dir: str, scheduler: str, record: Callable[[dict], None],
              run: Callable[[dict, str], dict] = run_job, label: str = "tour") -> None:
    try:
        from distributed import Client, as_completed
    except ImportError:
        raise ValueError("--scheduler needs Dask distributed: pip install -e \".[cluster]\" "
                         "(or pip install \"dask[distributed]\")") from None
    try:
        client = Client(scheduler, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError, ValueError) as error:
        raise ValueError(f"--scheduler {scheduler!r}: cannot connect to a Dask scheduler there "
                         f"({type(error).__name__}: {error})") from None
    with client:
        futures = {client.submit(run, job, out_dir, key=f"npformer-{label}-{job['id']}",
                                 pure=False): job for job in todo}
        for future in as_completed(futures):
            job = futures[future]
            try:
                result = future.result()
            except Exception as error:
                for other in futures:
                    other.cancel()
                raise JobFailed(f"job {job['id']} failed on the cluster: {type(error).__name__}: "
                                f"{error}") from error
            record(result)


def execute(jobs: Sequence[dict], out_dir: str, *, workers: int = 1,
            scheduler: Optional[str] = None, log=print,
            run: Callable[[dict, str], dict] = run_job, label: str = "tour") -> Dict[str, dict]:
    """Every job's result, running those not already finished in ``out_dir``.

    ``run(job, out_dir) -> result`` executes one job (a module-level function, so that worker
    processes can import it): the tour's :func:`~npformer.tour.jobs.run_job` by default, the
    softmax study's own for ``npformer study``; ``label`` names the experiment in the log."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers (--workers) must be an integer ≥ 1, got {workers!r}")
    out_dir = os.path.abspath(out_dir)
    os.makedirs(os.path.join(out_dir, JOBS_DIR), exist_ok=True)
    results = finished_results(jobs, out_dir)
    todo = [job for job in jobs if job["id"] not in results]
    where = f"Dask at {scheduler}" if scheduler else f"{workers} local worker(s)"
    log(f"{label}: {len(jobs)} jobs, {len(results)} already finished in {out_dir}; "
        f"running {len(todo)} on {where}")
    started, count = time.perf_counter(), len(results)

    def record(result: dict) -> None:
        nonlocal count
        ckpt.write_json(result_path(out_dir, result["id"]), result)
        results[result["id"]] = result
        count += 1
        done_here = count - (len(jobs) - len(todo))
        elapsed = time.perf_counter() - started
        left = elapsed / done_here * (len(jobs) - count)
        log(f"[{count:>{len(str(len(jobs)))}}/{len(jobs)}] {result['id']}: {_describe(result)} "
            f"({elapsed / 60:.1f} min, ~{left / 60:.1f} min left)")

    if todo:
        if scheduler:
            _run_dask(todo, out_dir, scheduler, record, run, label)
        else:
            _run_local(todo, out_dir, workers, record, run)
    return {job["id"]: results[job["id"]] for job in jobs}


def _versions() -> Dict[str, str]:
    import numba
    import numpy

    return dict(python=sys.version.split()[0], numpy=numpy.__version__, numba=numba.__version__)


def _read_sessions(out_dir: str) -> List[dict]:
    path = os.path.join(out_dir, SESSIONS)
    if not os.path.exists(path):
        return []
    sessions = ckpt.read_json(path)
    if not isinstance(sessions, list) or not all(
            isinstance(s, dict) and isinstance(s.get("seconds"), (int, float)) for s in sessions):
        raise ValueError(f"{path} must hold a list of sessions, each with its 'seconds'")
    return sessions


def _record_session(out_dir: str, session: dict) -> None:
    if os.path.isdir(out_dir):
        ckpt.write_json(os.path.join(out_dir, SESSIONS), _read_sessions(out_dir) + [session])


def run_experiment(jobs: Sequence[dict], out_dir: str, *, run: Callable[[dict, str], dict] = run_job,
                   label: str = "tour", workers: Optional[int] = None,
                   scheduler: Optional[str] = None, overwrite: bool = False,
                   command: str = "npformer tour", log=print):
    """Run (or resume) an experiment's jobs in ``out_dir`` and describe how it ran; returns
    ``(results by job id, meta)``, meta being what the report says about the machine, the
    executor and the wall time of every session (a resumed experiment adds up)."""
    if workers is None:
        workers = os.cpu_count() or 1
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir!r} is a file, not a directory")
    if overwrite:
        clear_tour(out_dir)
    already = len(finished_results(jobs, out_dir)) if os.path.isdir(out_dir) else 0
    executor = f"dask {scheduler}" if scheduler else "local processes"
    started, started_at = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        results = execute(jobs, out_dir, workers=workers, scheduler=scheduler, log=log, run=run,
                          label=label)
    finally:  # a stopped experiment's time counts too (a kill -9 loses only the session it ends)
        if len(jobs) > already:
            _record_session(out_dir, dict(started=started_at, seconds=time.perf_counter() - started,
                                          jobs_found_finished=already, executor=executor,
                                          workers=None if scheduler else workers))
    sessions = _read_sessions(out_dir)
    if sessions:  # the report describes the sessions that trained, not a re-reporting one
        executor = " then ".join(dict.fromkeys(str(s.get("executor")) for s in sessions))
        workers = " then ".join(dict.fromkeys(str(s.get("workers")) for s in sessions))
    meta = dict(cpu=cpu_model(), cores=os.cpu_count(), command=command, executor=executor,
                workers=None if scheduler and not sessions else workers,
                # the wall time: every session that ran jobs (a resumed experiment adds up)
                wall_time_s=math.fsum(s["seconds"] for s in sessions), sessions=sessions,
                jobs_total=len(jobs), jobs_found_finished=already,
                job_seconds_total=math.fsum(r.get("seconds", 0.0) for r in results.values()),
                versions=_versions())
    return results, meta


def run_tour(budget: Budget, out_dir: str, *, only: Optional[Sequence[str]] = None,
             workers: Optional[int] = None, scheduler: Optional[str] = None,
             overwrite: bool = False, command: str = "npformer tour", log=print) -> str:
    """Plan, run (or resume) and report a tour; returns the path of ``report.md``."""
    from .report import write_report

    plan = tour_plan(budget, only)
    results, meta = run_experiment(plan.jobs, out_dir, workers=workers, scheduler=scheduler,
                                   overwrite=overwrite, command=command, log=log)
    return write_report(out_dir, plan, results, meta)
