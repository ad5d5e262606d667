"""MkDocs hooks of the study guide (mkdocs.yml's `hooks:`).

A snippet fenced ```python no-run is shown but not executed by tests/test_docs.py. GitHub reads
the info string's first word as the language and ignores the rest; pymdownx.superfences does
not accept a bare word after the language and would print the fence as text. So the page's
Markdown reaches superfences with the marker removed (the block renders as plain ```python).
"""

from __future__ import annotations

import re

_NO_RUN_FENCE = re.compile(r"^(?P<open>[ \t]*(?:`{3,}|~{3,})[ \t]*python)[ \t]+no-run[ \t]*$",
                           re.MULTILINE)


def strip_no_run(markdown: str) -> str:
    """```python no-run → ```python (same indentation, same fence length)."""
    return _NO_RUN_FENCE.sub(r"\g<open>", markdown)


def on_page_markdown(markdown: str, **kwargs) -> str:
    return strip_no_run(markdown)
