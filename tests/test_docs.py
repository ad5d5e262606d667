"""The study guide (docs/ and mkdocs.yml) is built and executed, not only written.

- `mkdocs build --strict` succeeds, and strict mode really fails on a broken link, a broken
  anchor and a page left out of the nav (proved on a two-page copy of the configuration);
- every ```python block of every page runs: per page, blocks top to bottom in one namespace,
  with the page's own line numbers in a traceback; a block fenced ```python no-run is shown
  only, and a page may have at most one;
- every module of npformer/functional/ has its page docs/functional/<module>.md that renders
  the module's code (a `::: npformer.functional.<module>.…` block); every page is in the nav
  and every nav entry is a page;
- every page has the sections `## Forward` (shapes) and `## Derivation` (which
  `npformer explain` prints), and at least one runnable snippet — except the pages that derive
  nothing of their own: index.md (the reading order), notation.md (the table) and lineage/*.md
  (a preset is a set of switches; its maths is on the pages it links to).
"""

from __future__ import annotations

import importlib.util
import linecache
import re
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

import mkdocs.config as mkdocs_config  # the test and docs extras install mkdocs
from mkdocs.commands.build import build as mkdocs_build
from mkdocs.exceptions import Abort
from mkdocs.utils.yaml import yaml_load

REPO = Path(__file__).resolve().parents[1]

DOCS = REPO / "docs"
MKDOCS_YML = REPO / "mkdocs.yml"
_hooks_spec = importlib.util.spec_from_file_location("mkdocs_hooks", REPO / "mkdocs_hooks.py")
mkdocs_hooks = importlib.util.module_from_spec(_hooks_spec)
_hooks_spec.loader.exec_module(mkdocs_hooks)  # mkdocs.yml's hooks: the file the build loads
FUNCTIONAL = REPO / "npformer" / "functional"

# a path equal to or under these; tour/ and study/ are measured reports (npformer tour, study)
EXEMPT_FROM_SECTIONS = ("index.md", "notation.md", "lineage/", "tour/", "study/")
MAX_NO_RUN_PER_PAGE = 1
RUNNABLE_LANGUAGES = ("python", "py", "python3")


def docs_pages() -> list[str]:
    """Every Markdown page under docs/, as a path relative to docs/ (the nav's spelling)."""
    return sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))


def nav_pages() -> list[str]:
    """The page paths of mkdocs.yml's nav, in reading order."""
    with open(MKDOCS_YML, encoding="utf-8") as f:
        config = yaml_load(f)
    paths: list[str] = []

    def walk(entry):
        if isinstance(entry, str):
            paths.append(entry)
        elif isinstance(entry, list):
            for item in entry:
                walk(item)
        elif isinstance(entry, dict):
            for value in entry.values():
                walk(value)

    walk(config["nav"])
    return [p for p in paths if "://" not in p]  # an external link is not a page


def functional_modules() -> list[str]:
    """The public modules of npformer/functional/ (a leading underscore marks a private helper)."""
    return sorted(p.stem for p in FUNCTIONAL.glob("*.py") if not p.stem.startswith("_"))


def is_exempt(page: str) -> bool:
    return any(page == e or (e.endswith("/") and page.startswith(e)) for e in EXEMPT_FROM_SECTIONS)


@dataclass
class CodeBlock:
    language: str
    options: tuple  # the words after the language in the fence's info string, e.g. ("no-run",)
    first_line: int  # 1-based line number, in the page, of the block's first code line
    source: str

    @property
    def runs(self) -> bool:
        return self.language in RUNNABLE_LANGUAGES and "no-run" not in self.options


_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*?)[ \t]*$")


def code_blocks(text: str) -> list[CodeBlock]:
    """The fenced code blocks of a Markdown page (also when indented, e.g. in an admonition)."""
    lines = text.splitlines()
    blocks: list[CodeBlock] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        words = opening["info"].replace("{", " ").replace("}", " ").replace(".", " ", 1).split()
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            closing = _FENCE.match(lines[j])
            if (closing is not None and closing["info"] == "" and closing["fence"][0] == fence[0]
                    and len(closing["fence"]) >= len(fence)):
                break
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j])
            j += 1
        else:
            raise AssertionError(f"an unclosed {fence} fence opened at line {i + 1}")
        language = words[0].lower() if words else ""
        blocks.append(CodeBlock(language, tuple(w.lower() for w in words[1:]), i + 2,
                                "\n".join(body) + "\n"))
        i = j + 1
    return blocks


def page_blocks(page: str) -> list[CodeBlock]:
    return code_blocks((DOCS / page).read_text(encoding="utf-8"))


PAGES = docs_pages()
PAGES_WITH_SNIPPETS = [page for page in PAGES if any(b.runs for b in page_blocks(page))]


# ---------------------------------------------------------------------------------------------
# the build


def build_site(site_dir: Path, **overrides) -> None:
    """`mkdocs build --strict -f mkdocs.yml -d site_dir` in this process (Abort on a warning)."""
    config = mkdocs_config.load_config(config_file=str(MKDOCS_YML), site_dir=str(site_dir),
                                       strict=True, **overrides)
    mkdocs_build(config)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The whole guide, built once for this module's checks of the result."""
    site_dir = tmp_path_factory.mktemp("site")
    build_site(site_dir)
    return site_dir


def page_text(html: str) -> str:
    """A built page's article with its mathematics, code and tags removed: the prose a reader
    sees as text (a `$` left in it is mathematics arithmatex did not recognise)."""
    article = html[html.index("<article"):html.index("</article>")]
    for pattern in (r'<(span|div) class="arithmatex">.*?</\1>', r"<pre.*?</pre>",
                    r"<code.*?</code>", r"<[^>]+>"):
        article = re.sub(pattern, " ", article, flags=re.S)
    return article


def test_strict_build_succeeds(site):
    # the code link renders: the RMSNorm page shows rmsnorm_backward's source
    html = (site / "functional" / "rmsnorm" / "index.html").read_text(encoding="utf-8")
    assert ("rmsnorm_backward" in html
            and "Source code in <code>npformer/functional/rmsnorm.py</code>" in html)
    # the maths is left for MathJax (arithmatex generic), which the page loads
    assert 'class="arithmatex"' in html and "mathjax" in html.lower()


def test_every_built_page_renders_its_fences_and_math(site):
    """No page shows a code fence as text (an info string superfences refused) or a `$` as
    text (mathematics arithmatex did not take: `$x = $` with a space before the closing
    dollar, or a `$$` block inside a list item without blank lines around it)."""
    pages = {p.relative_to(site).as_posix(): p.read_text(encoding="utf-8")
             for p in site.rglob("index.html") if p.parent.name not in ("search", "assets")}
    assert "functional/rmsnorm/index.html" in pages
    printed_fences = sorted(name for name, html in pages.items()
                            if re.search(r"<p>\s*(```|~~~)", html))
    assert not printed_fences, f"pages showing a code fence as text: {printed_fences}"
    stray = {}
    for name, html in pages.items():
        if "<article" not in html:
            continue
        text = page_text(html)
        contexts = [" ".join(text[max(0, m.start() - 40):m.end() + 20].split())
                    for m in re.finditer(r"\$", text)]
        if contexts:
            stray[name] = contexts[:3]
    assert not stray, f"pages showing '$' as text (unrendered mathematics): {stray}"


def test_page_text_finds_unrendered_math():
    """The check above on a hand-made page: rendered maths and code pass, a stray $ is seen."""
    rendered = ('<article><p><span class="arithmatex">\\(x\\)</span> and <code>$HOME</code></p>'
                '<div class="arithmatex">\\[y\\]</div><pre>$</pre></article>')
    assert "$" not in page_text(rendered)
    assert "$" in page_text("<article><p>with $\\alpha = $ and</p></article>")


_GOOD_PAGE = "# Home\n\nSee [the other page](other.md#a-section).\n"
_OTHER_PAGE = "# Other\n\n## A section\n\nText.\n"


@pytest.mark.parametrize("breakage", ["missing page", "missing anchor", "page not in nav"])
def test_strict_build_fails_on_broken_link(tmp_path, breakage):
    """The same configuration on a two-page site: it builds, and each breakage fails it."""
    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copytree(DOCS / "javascripts", docs / "javascripts")
    (docs / "index.md").write_text(_GOOD_PAGE, encoding="utf-8")
    (docs / "other.md").write_text(_OTHER_PAGE, encoding="utf-8")
    nav = [{"Home": "index.md"}, {"Other": "other.md"}]
    build_site(tmp_path / "good", docs_dir=str(docs), nav=nav)  # the intact copy builds

    if breakage == "missing page":
        (docs / "index.md").write_text(_GOOD_PAGE.replace("other.md", "othr.md"), encoding="utf-8")
    elif breakage == "missing anchor":
        (docs / "index.md").write_text(_GOOD_PAGE.replace("#a-section", "#no-such-section"),
                                       encoding="utf-8")
    else:
        (docs / "orphan.md").write_text("# Orphan\n", encoding="utf-8")
    with pytest.raises(Abort, match="strict mode"):
        build_site(tmp_path / "broken", docs_dir=str(docs), nav=nav)


# ---------------------------------------------------------------------------------------------
# the snippets


def run_snippets(path: Path, filename: str) -> None:
    """Run the page's ```python blocks, top to bottom, in one namespace. The source handed to
    compile is padded to the block's place, so a traceback shows `filename` and the page's own
    line numbers and text."""
    text = path.read_text(encoding="utf-8")
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
    # kept in the cache (mtime None: never checked against a file) for pytest's report
    namespace = {"__name__": "__docs__", "__file__": str(path)}
    for block in code_blocks(text):
        if block.runs:
            padded = "\n" * (block.first_line - 1) + block.source
            exec(compile(padded, filename, "exec"), namespace)  # noqa: S102


@pytest.mark.parametrize("page", PAGES_WITH_SNIPPETS)
def test_page_snippets_run(page, tmp_path, monkeypatch):
    """In a scratch directory, with matplotlib drawing to files."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    run_snippets(DOCS / page, f"docs/{page}")


def test_no_run_blocks_are_few():
    too_many = {page: n for page in PAGES
                if (n := sum(b.language in RUNNABLE_LANGUAGES and not b.runs
                             for b in page_blocks(page))) > MAX_NO_RUN_PER_PAGE}
    assert not too_many, (f"pages with more than {MAX_NO_RUN_PER_PAGE} ```python no-run block: "
                          f"{too_many}; make them run")


def test_code_block_parser():
    """The fence reader the snippet test relies on: languages, options, line numbers, indents,
    longer fences holding shorter ones."""
    text = ("# T\n"  # 1
            "```python\n"  # 2
            "a = 1\n"  # 3
            "```\n"  # 4
            "!!! note\n"  # 5
            "    ```python no-run\n"  # 6
            "    b = 2\n"  # 7
            "    ```\n"  # 8
            "````markdown\n"  # 9
            "```python\n"  # 10
            "````\n"  # 11
            "```bash\n"  # 12
            "ls\n"  # 13
            "```\n")  # 14
    blocks = code_blocks(text)
    assert [(b.language, b.options, b.first_line, b.source, b.runs) for b in blocks] == [
        ("python", (), 3, "a = 1\n", True),
        ("python", ("no-run",), 7, "b = 2\n", False),
        ("markdown", (), 10, "```python\n", False),
        ("bash", (), 13, "ls\n", False),
    ]
    with pytest.raises(AssertionError, match="unclosed"):
        code_blocks("```python\nx = 1\n")
    # the build hook hands superfences a plain ```python for a no-run block
    assert mkdocs_hooks.strip_no_run(text) == text.replace("```python no-run", "```python")


def test_a_failing_snippet_names_its_page_and_line(tmp_path):
    """The namespace carries over from block to block, and a failing block's traceback shows
    the page and the failing line's number in the page."""
    page = tmp_path / "bad.md"
    page.write_text("# Bad\n\n```python\nx = 1\n```\n\ntext\n\n```python\nassert x == 2\n```\n",
                    encoding="utf-8")
    with pytest.raises(AssertionError) as raised:
        run_snippets(page, "docs/bad.md")
    last = traceback.extract_tb(raised.tb)[-1]
    assert (last.filename, last.lineno, last.line) == ("docs/bad.md", 10, "assert x == 2")


# ---------------------------------------------------------------------------------------------
# pages, nav, sections


def test_every_functional_module_has_a_page_with_its_code():
    missing = [m for m in functional_modules() if not (DOCS / "functional" / f"{m}.md").exists()]
    assert not missing, f"npformer/functional/ modules without a page docs/functional/<m>.md: {missing}"
    no_code = [m for m in functional_modules()
               if f"::: npformer.functional.{m}" not in (DOCS / "functional" / f"{m}.md").read_text(
                   encoding="utf-8")]
    assert not no_code, (f"pages that do not render their module's code "
                         f"(a '::: npformer.functional.<m>.<function>' block): {no_code}")


def test_every_page_is_in_the_nav_and_every_nav_entry_is_a_page():
    nav = nav_pages()
    duplicates = sorted({p for p in nav if nav.count(p) > 1})
    assert not duplicates, f"pages listed twice in mkdocs.yml's nav: {duplicates}"
    not_in_nav = sorted(set(PAGES) - set(nav))
    assert not not_in_nav, f"pages under docs/ missing from mkdocs.yml's nav: {not_in_nav}"
    no_file = [p for p in nav if not (DOCS / p).is_file()]
    assert not no_file, f"mkdocs.yml's nav entries without a file under docs/: {no_file}"


def _headings(page: str) -> list[str]:
    text = (DOCS / page).read_text(encoding="utf-8")
    inside_code = {i for b in code_blocks(text) for i in range(b.first_line - 1,
                                                               b.first_line + b.source.count("\n"))}
    return [line.rstrip() for n, line in enumerate(text.splitlines(), start=1)
            if line.startswith("#") and n not in inside_code]


@pytest.mark.parametrize("page", [p for p in PAGES if not is_exempt(p)])
def test_page_has_forward_derivation_and_a_snippet(page):
    headings = _headings(page)
    for section in ("## Forward", "## Derivation"):
        assert headings.count(section) == 1, (
            f"docs/{page} needs exactly one section headed '{section}' "
            f"(npformer explain reads '## Derivation'); its headings: {headings}")
    assert any(b.runs for b in page_blocks(page)), (
        f"docs/{page} has no runnable ```python snippet (a tiny input, the analytic gradient "
        f"against finite differences or torch)")


def test_exemptions_are_the_stated_ones():
    """The section rule exempts exactly the reading order, the notation, the lineage and the
    measured reports of the tour and the softmax study."""
    assert is_exempt("index.md") and is_exempt("notation.md") and is_exempt("lineage/gpt2.md")
    assert is_exempt("tour/report.md") and is_exempt("study/softmax/report.md")
    assert not is_exempt("functional/rmsnorm.md") and not is_exempt("models/decoder.md")
    assert not is_exempt("blocks/lineage.md")
