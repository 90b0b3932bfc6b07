"""Every ```python block in README.md and docs/*.md runs as part of the suite, so the docs cannot
drift from the code. The blocks of one page share a namespace and run in order (later blocks build
on earlier ones), from the repository root.

A block that needs real SD v1.5 weights (which cannot be had here) is preceded by the line
``<!-- needs-real-weights -->``: it is compiled (so its syntax is checked) but not run, and
test_real_weight_blocks_are_listed prints the list of such blocks with their count.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
MARKER = "<!-- needs-real-weights -->"
BLOCK = re.compile(r"(<!-- needs-real-weights -->\s*\n)?```python\n(.*?)```", re.S)


def blocks(page):
    """[(needs_real_weights, code, line number)] of one page."""
    text = page.read_text()
    return [(bool(m.group(1)), m.group(2), text.count("\n", 0, m.start(2)) + 1) for m in BLOCK.finditer(text)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_code_blocks_run(page, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    namespace = {"__name__": f"docs_{page.stem}"}
    ran = 0
    for real, code, line in blocks(page):
        compiled = compile("\n" * (line - 1) + code, str(page.relative_to(ROOT)), "exec")
        if not real:
            exec(compiled, namespace)
            ran += 1
    print(f"{page.relative_to(ROOT)}: {ran} blocks ran")


def test_real_weight_blocks_are_listed():
    marked = [f"{p.relative_to(ROOT)}:{line}" for p in PAGES for real, _, line in blocks(p) if real]
    print(f"{len(marked)} docs blocks need real SD v1.5 weights and were compiled, not run: {marked}")
    for p in PAGES:                               # every marker must sit right before a python block
        assert p.read_text().count(MARKER) == sum(real for real, _, _ in blocks(p)), p


def test_docs_have_code():
    assert sum(len(blocks(p)) for p in PAGES) >= 5
