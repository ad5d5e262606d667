"""Running the softmax study: ``npformer study softmax``, resumable, local or on Dask.

    npformer study softmax [--quick] [--seeds N] [--steps N] [--out DIR]
                           [--workers N] [--scheduler tcp://HOST:8786] [--overwrite]

The jobs run exactly as the tour's (:mod:`npformer.tour.runner`): ``--workers`` single-threaded
processes (default: one per core) or a Dask cluster; each result is written atomically to
``OUT/jobs/<id>.json`` when it arrives, a restarted study runs only the missing jobs, a job
killed mid-training resumes from its checkpoint (and keeps the measurements it already took,
``OUT/runs/<id>/measures/``), and a result computed with other settings is refused by name.
"""

from __future__ import annotations

from typing import Optional

from ..tour.runner import run_experiment
from .jobs import run_study_job
from .plan import StudyBudget, study_plan


def run_study(budget: StudyBudget, out_dir: str, *, workers: Optional[int] = None,
              scheduler: Optional[str] = None, overwrite: bool = False,
              command: str = "npformer study softmax", log=print) -> str:
    """Plan, run (or resume) and report the study; returns the path of ``report.md``."""
    from .report import write_report

    plan = study_plan(budget)
    results, meta = run_experiment(plan.jobs, out_dir, run=run_study_job, label="study",
                                   workers=workers, scheduler=scheduler, overwrite=overwrite,
                                   command=command, log=log)
    return write_report(out_dir, plan, results, meta)
