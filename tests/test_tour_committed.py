"""The committed tour (docs/tour/) is what the code computes from its committed runs, and the
README shows the report's own summary rows."""

import dataclasses
import json
import re
from pathlib import Path

from npformer.tour import report
from npformer.tour.plan import Budget, tour_plan

ROOT = Path(__file__).resolve().parents[1]
TOUR = ROOT / "docs" / "tour"
RESULTS = json.loads((TOUR / "results.json").read_text(encoding="utf-8"))
REPORT = (TOUR / "report.md").read_text(encoding="utf-8")
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _committed_plan():
    fields = {f.name for f in dataclasses.fields(Budget)}
    budget = {k: tuple(v) if isinstance(v, list) else v for k, v in RESULTS["budget"].items()}
    assert set(budget) == fields  # the budget of the committed run, whole
    return tour_plan(Budget(**budget))


def test_the_committed_analysis_is_what_the_code_computes_from_the_committed_runs():
    plan = _committed_plan()
    assert set(RESULTS["jobs"]) == {job["id"] for job in plan.jobs}  # a complete tour
    for job in plan.jobs:  # each result was computed for exactly the job the plan makes
        assert RESULTS["jobs"][job["id"]]["job"] == json.loads(json.dumps(job)), job["id"]
    assert report.analyse(plan, RESULTS["jobs"]) == RESULTS["comparisons"]


def _summary_rows(text: str, heading: str):
    """The first Markdown table after ``heading``: its lines, header and rule included."""
    lines = text.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def test_the_readme_table_is_the_reports_summary():
    rows = _summary_rows(REPORT, "## Summary")
    assert len(rows) > 2 + len(RESULTS["comparisons"])  # header, rule, one row per pair or more
    readme_rows = _summary_rows(README, "## The tour")
    assert readme_rows == rows


def test_every_figure_of_the_committed_report_is_there():
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", REPORT)
    assert links
    for link in links:
        assert (TOUR / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", link
