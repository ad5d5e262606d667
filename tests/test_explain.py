"""``npformer explain NAME``: the derivation from the docs page, the check live, the pictures.

Most tests read a fixture docs directory written here (every page of the study guide, each
with its own markers), so that they test explain itself; ``test_explain_reads_the_real_docs``
reads the repository's docs/ (it fails until the docs pages exist).
"""

import struct
from pathlib import Path

import numpy as np
import pytest

from npformer import explain
from npformer.cli import main
from npformer.explain import (
    CHECK_PAGES, PAGE_RUNS, PAGES, PAGES_WITHOUT_DERIVATION, latex_to_text, markdown_to_text,
)
from npformer.gradcheck import (
    _REGISTRY, check_gradients, check_pair, recording_entries, registered_checks,
)

# The pages of the study guide: the Markdown files of the real docs/, independently of explain
REAL_DOCS = Path(__file__).resolve().parent.parent / "docs"
# (docs/tour/ and docs/study/ hold measured reports, not pages of the guide to explain)
GUIDE_PAGES = {path.relative_to(REAL_DOCS).with_suffix("").as_posix()
               for path in REAL_DOCS.rglob("*.md") if path.relative_to(REAL_DOCS).parts[0] not in ("tour", "study")}
CHECKS = list(registered_checks())
PAGE_NAMES = sorted(explain.page_name(p) for p in PAGE_RUNS)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

FIXTURE_PAGE = """# {page}

Builds on [linear](../functional/linear.md).

## Forward

FORWARD-OF {page}: $y = x W^\\top + b$ with shapes $(N, C)$.

## Derivation

DERIVATION-OF {page}:

$$
\\frac{{\\partial \\ell}}{{\\partial x}} = \\bar y\\, W
$$

### A step

```python
## a comment, not a heading
x = 1
```

Still the derivation: $\\sqrt{{v + \\varepsilon}}$.

## The code

NOT-PRINTED {page}
"""


@pytest.fixture(scope="module")
def fixture_docs(tmp_path_factory):
    """A docs directory with every page of the guide, each naming itself in its sections."""
    root = tmp_path_factory.mktemp("docs")
    for page in PAGES:
        path = root / f"{page}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(FIXTURE_PAGE.format(page=page), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def masks_drawn_once():
    """``preset_attention_masks`` draws one picture that depends on nothing but the presets
    (no argument but the path), and about 20 checks ask for it (~5 s of matplotlib each).
    Within this module it is drawn for real once; later calls write those same PNG bytes to
    their own path, so each test still sees the file appear where write_pictures put it."""
    from npformer import explain_pictures

    draw = explain_pictures.preset_attention_masks
    drawn = {}

    def draw_once(path):
        if "png" not in drawn:
            drawn["png"] = Path(draw(path)).read_bytes()
        else:
            Path(path).write_bytes(drawn["png"])
        return path

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(explain_pictures, "preset_attention_masks", draw_once)
        yield


def _explain(capsys, *args):
    code = main(["explain", *args])
    out, err = capsys.readouterr()
    return code, out, err


def _png_size(path):
    """(width, height) of a PNG, after checking its signature and IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# ---- the tables ------------------------------------------------------------------------

def test_every_registered_check_has_a_page_of_the_guide():
    assert set(PAGES) == GUIDE_PAGES
    assert set(CHECK_PAGES) == set(CHECKS), "a check without a page, or a page entry without a check"
    assert set(CHECK_PAGES.values()) <= GUIDE_PAGES - set(PAGES_WITHOUT_DERIVATION)


def test_every_page_with_a_derivation_runs_a_check_that_exists():
    from npformer.presets import preset_names

    assert set(PAGE_RUNS) == GUIDE_PAGES - set(PAGES_WITHOUT_DERIVATION)
    for page, (kind, name) in PAGE_RUNS.items():
        assert (kind, name in (CHECKS if kind == "check" else preset_names())) == (kind, True), page
        if kind == "check":  # a page runs one of its own checks, where it has any
            own = [c for c, p in CHECK_PAGES.items() if p == page]
            assert not own or name in own, (page, name, own)
    assert len(set(PAGE_NAMES)) == len(PAGE_NAMES), "two pages with one short name"


# ---- explain NAME, every registered check ----------------------------------------------

@pytest.mark.parametrize("name", CHECKS)
def test_explain_every_check_prints_the_derivation_and_the_side_by_side_and_draws(
        name, fixture_docs, masks_drawn_once, tmp_path, capsys):
    code, out, err = _explain(capsys, name, "--docs", str(fixture_docs), "--png", str(tmp_path))
    assert code == 0, err
    page = CHECK_PAGES[name]
    # (1) the page's Forward and Derivation sections, LaTeX converted, nothing else of it
    assert f"FORWARD-OF {page}:" in out and f"DERIVATION-OF {page}:" in out
    assert "y = x Wᵀ + b" in out and "∂ℓ/∂x = y\u0304 W" in out and "√(v + ε)" in out
    assert "## a comment, not a heading" in out  # a code block inside the section is kept
    assert "NOT-PRINTED" not in out and "[linear]" not in out
    # (2) the check: for every tensor its entries side by side, then its max errors
    run = explain.run_check("check", name)
    assert f"npformer gradcheck {name} (float64" in out
    header = out.index("## Analytic vs finite-difference gradients")
    for report, entries in zip(run.reports, run.entries):
        assert f"{report.tensor}, shape {tuple(entries.shape)}: {report.n_checked} of" in out
        k = int(np.argmax(np.abs(entries.analytic - entries.numeric)))
        row = (f"{entries.analytic[k]:+.12e}  {entries.numeric[k]:+.12e}  "
               f"{entries.analytic[k] - entries.numeric[k]:+.1e}  (largest)")
        assert row in out[header:], (report.tensor, row)
    assert f"{len(run.reports)} passed, 0 failed" in out
    # (3) the pictures: the scatter always, the topic's pictures where they apply
    written = sorted(p.name for p in tmp_path.iterdir())
    expected = {f"{name}_gradients.png"}
    if page in ("functional/softmax", "functional/cross_entropy", "functional/softmax_variants") \
            or name == "fused_cross_entropy":
        expected.add(f"{name}_softmax_jacobian.png")
    if name.startswith(("attention_", "kernel_")) or name in ("mha_module", "qk_norm"):
        expected.add(f"{name}_attention_masks.png")
    if name.startswith("rope_") or name == "fused_rope":
        expected.add(f"{name}_rope_rotation.png")
    assert set(written) == expected
    for file in tmp_path.iterdir():
        width, height = _png_size(file)
        assert width >= 400 and height >= 250 and file.stat().st_size > 10_000, file.name
        assert f"wrote {file}" in out


@pytest.mark.parametrize("name", PAGE_NAMES)
def test_explain_every_page_name(name, fixture_docs, capsys):
    code, out, err = _explain(capsys, name, "--docs", str(fixture_docs))
    assert code == 0, err
    page = next(p for p in PAGE_RUNS if explain.page_name(p) == name)
    kind, run_name = PAGE_RUNS[page]
    assert f"DERIVATION-OF {page}:" in out
    source = f"--preset {run_name}:" if kind == "preset" else f"npformer gradcheck {run_name} ("
    assert source in out and "(largest)" in out and " passed, 0 failed" in out


def test_explain_reads_the_real_docs(monkeypatch, capsys):
    """Every registered check and page against the repository's docs/ (beside the package).
    Fails until the study guide's pages are merged."""
    monkeypatch.delenv(explain.DOCS_ENV, raising=False)
    for name in CHECKS + PAGE_NAMES:
        code, out, err = _explain(capsys, name)
        assert code == 0, f"{name}: {err}"
        assert "## Derivation" in out and "(largest)" in out, name


# ---- failures and bad input --------------------------------------------------------------

def test_a_wrong_backward_shows_its_difference_and_exits_1(fixture_docs, monkeypatch, capsys):
    def broken_check():
        x = np.random.default_rng(3).standard_normal((2, 3)) + 0.5
        return check_pair("broken_square", lambda x: (x * x, x), lambda dy, x: 3 * x * dy,
                          {"x": x}, ("x",))  # dx should be 2 x dy

    monkeypatch.setitem(_REGISTRY, "broken_square", broken_check)
    monkeypatch.setitem(CHECK_PAGES, "broken_square", "functional/relu")
    code, out, _ = _explain(capsys, "broken_square", "--docs", str(fixture_docs))
    assert code == 1
    assert "FAIL" in out and "1 failed" in out
    run = explain.run_check("check", "broken_square")
    entries = run.entries[0]
    # analytic = 3 x · probe, numeric = 2 x · probe: the shown difference is x · probe
    assert np.allclose(entries.analytic, 1.5 * entries.numeric, rtol=1e-6)


def test_unknown_name_is_one_line_exit_2(fixture_docs, capsys):
    code, out, err = _explain(capsys, "rmsnrom", "--docs", str(fixture_docs))
    assert code == 2 and out == ""
    assert err.count("\n") == 1
    assert err.startswith("npformer explain: unknown name 'rmsnrom'; did you mean rmsnorm")
    assert "npformer gradcheck --list" in err


def test_missing_docs_dir_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "no-docs"
    code, out, err = _explain(capsys, "rmsnorm", "--docs", str(missing))
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"npformer explain: no docs directory at {missing} (given)")
    monkeypatch.setenv(explain.DOCS_ENV, str(missing))
    code, _, err = _explain(capsys, "rmsnorm")
    assert code == 2 and f"no docs directory at {missing} (from $NPFORMER_DOCS)" in err
    # beside the package: the path a source checkout has
    monkeypatch.delenv(explain.DOCS_ENV)
    monkeypatch.setattr(explain, "__file__", str(tmp_path / "pkg" / "npformer" / "explain.py"))
    code, _, err = _explain(capsys, "rmsnorm")
    assert code == 2 and f"no docs directory at {tmp_path / 'pkg' / 'docs'} (beside the package)" in err


def test_missing_page_or_section_is_one_line(fixture_docs, tmp_path, capsys):
    docs = tmp_path / "docs"
    (docs / "functional").mkdir(parents=True)
    code, _, err = _explain(capsys, "rmsnorm", "--docs", str(docs))
    assert code == 2 and err.count("\n") == 1
    assert f"no docs page {docs / 'functional' / 'rmsnorm.md'}" in err
    (docs / "functional" / "rmsnorm.md").write_text("# RMSNorm\n\n## Forward\n\ny\n\n## The code\n")
    code, _, err = _explain(capsys, "rmsnorm", "--docs", str(docs))
    assert code == 2 and err.count("\n") == 1
    assert "has no (or an empty) '## Derivation' section; its sections: Forward, The code" in err


def test_png_into_a_file_is_an_error(fixture_docs, tmp_path, capsys):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    code, _, err = _explain(capsys, "relu", "--docs", str(fixture_docs), "--png", str(a_file))
    assert code == 2 and f"--png {a_file} is a file" in err


# ---- the entries gradcheck records for explain -------------------------------------------

def test_recorded_entries_are_the_ones_each_report_summarises():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4))
    w = rng.standard_normal(200)  # more than max_entries: a seeded subset is compared

    def loss():
        return float(np.sum(np.sin(x)) * np.sum(w ** 2))

    analytic = {"x": np.cos(x) * np.sum(w ** 2), "w": 2 * w * np.sum(np.sin(x))}
    check_gradients("outside", loss, {"x": x}, {"x": analytic["x"]})  # not recorded
    with recording_entries() as entries:
        reports = check_gradients("t", loss, {"x": x, "w": w}, analytic, max_entries=50)
    assert [(e.name, e.tensor, e.shape) for e in entries] == [("t", "x", (3, 4)), ("t", "w", (200,))]
    for report, recorded in zip(reports, entries):
        assert len(recorded.flat_indices) == report.n_checked == len(recorded.numeric)
        assert np.array_equal(recorded.analytic, analytic[report.tensor].reshape(-1)[recorded.flat_indices])
        assert np.max(np.abs(recorded.analytic - recorded.numeric)) == report.max_abs_err
    assert len(set(entries[1].flat_indices)) == 50
    with recording_entries() as outer:  # nested recorders: each keeps its own block's
        with recording_entries() as inner:
            check_gradients("n", loss, {"x": x}, {"x": analytic["x"]})
        check_gradients("m", loss, {"x": x}, {"x": analytic["x"]})
    assert [e.name for e in inner] == ["n"] and [e.name for e in outer] == ["n", "m"]


# ---- LaTeX for a terminal ----------------------------------------------------------------

@pytest.mark.parametrize("tex, text", [
    (r"\frac{\partial \ell}{\partial y}", "∂ℓ/∂y"),
    (r"r = \frac{1}{\sqrt{v + \varepsilon}}", "r = 1/√(v + ε)"),
    (r"p_i = \frac{e^{z_i}}{\sum_{k=1}^{V} e^{z_k}}", "pᵢ = e^{zᵢ}/(Σₖ₌₁ⱽ e^{zₖ})"),
    (r"J = \operatorname{diag}(p) - p\,p^\top", "J = diag(p) - p pᵀ"),
    (r"\bar z = p \odot \bigl(\bar p - \langle \bar p, p\rangle\bigr)", "z̄ = p ⊙ (p̄ - ⟨p̄, p⟩)"),
    (r"\hat x = (x - \mu)\, r", "x̂ = (x - μ) r"),
    (r"x \in \mathbb{R}^{B \times T \times C}", "x ∈ ℝ^{B × T × C}"),
    (r"\delta = \operatorname{rowsum}(dO \odot O)", "δ = rowsum(dO ⊙ O)"),
    (r"\theta_i = 10000^{-2i/D}", "θᵢ = 10000^{-2i/D}"),
    (r"\sigma(x) = \frac{1}{1 + e^{-x}}", "σ(x) = 1/(1 + e⁻ˣ)"),
    (r"\log\sum_k e^{z_k} \le \log V", "log Σₖ e^{zₖ} ≤ log V"),
    (r"\text{if } s > c \qquad \tanh(s/c)", "if s > c    tanh(s/c)"),
    (r"W^{-1} x^2 \cdot \Omega_{ij}", "W⁻¹ x² · Ωᵢⱼ"),
    (r"\begin{aligned} a &= b \\ c &= d \end{aligned}", "a = b\nc = d"),
    (r"R = \begin{pmatrix} \cos m\theta & -\sin m\theta \\ \sin m\theta & \cos m\theta \end{pmatrix}",
     "R = [[cos mθ, -sin mθ], [sin mθ, cos mθ]]"),
    (r"f(x) = \begin{cases} x & x > 0 \\ 0 & \text{otherwise} \end{cases}",
     "f(x) = { x, x > 0; 0, otherwise }"),
    (r"a \qquad\Longrightarrow\qquad b \lesssim c", "a    ⟹    b ≲ c"),
    (r"\bar{\hat x}_j", "x\u0302\u0304ⱼ"),
])
def test_latex_to_text(tex, text):
    assert latex_to_text(tex) == text


@pytest.mark.parametrize("tex", [
    r"\mathfrak{g} + \foo{x}{y}",  # unknown macros keep their backslash and arguments
    r"\begin{array}{cc} a & b \end{array}",  # a layout it does not draw
])
def test_latex_it_cannot_convert_stays_latex(tex):
    assert latex_to_text(tex) == tex


def test_markdown_to_text():
    page = ("See [softmax](softmax.md) and [the code][npformer.functional.softmax]: **stably** "
            "$p_i$, code `x_i` and $$a^2$$ inline.\n\n$$\n\\bar x = W^\\top \\bar y\n$$\n\n"
            "```python\nz = \"$not maths$\"  # [not a link](x)\n```\n\n"
            "::: npformer.functional.softmax.softmax_forward\n    options:\n      show_source: true\n\n"
            "| $x$ | $(N, C)$ |")
    assert markdown_to_text(page) == (
        "See softmax and the code: stably pᵢ, code `x_i` and a² inline.\n\n"
        "    x\u0304 = Wᵀ y\u0304\n\n"
        "```python\nz = \"$not maths$\"  # [not a link](x)\n```\n\n"
        "| x | (N, C) |")
