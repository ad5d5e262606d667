"""``npformer tour``: the lineage trained side by side, each step measured against its parent.

    plan.py     what is trained: comparisons, variants, matched sizes, budgets, the jobs
    jobs.py     one job: a training run and its measurements (a JSON dict in, a JSON dict out)
    timing.py   one comparison's variants timed side by side in one process
    runner.py   the jobs in local worker processes or on a Dask cluster; resume
    stats.py    paired differences over seeds, 95 % intervals, verdicts
    report.py   report.md, the figures and results.json
"""
