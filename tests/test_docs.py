"""Every ```python block in README.md and docs/*.md runs as part of the suite, so the docs cannot
drift from the code. The blocks of one page share a namespace and run in order (later blocks build
on earlier ones), from the repository root.

A block that needs real SD v1.5 weights (which cannot be had here) is preceded by the line
``<!-- needs-real-weights -->``: it is compiled (so its syntax is checked) but not run, and
test_real_weight_blocks_are_listed prints the list of such blocks with their count.

The same pages are checked for what they name: every `npsd.X.Y` name exists, every repository
path exists, every markdown table has the same number of cells in each row, and docs/README.md
lists every page of docs/. Each checking function is tested on a planted error first.
"""

import importlib
import re
import types
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


# --- what the pages name must exist -------------------------------------------------------------

NAME = re.compile(r"(?<![\w./-])npsd(?:\.[A-Za-z_]\w*)+")
REPO_DIRS = ("npsd", "tests", "docs", "benchmarks", "weights", "tools", ".ci")   # paths from the root
PATH = re.compile(r"(?<![\w./~-])((?:%s|images)/[\w./-]*|[\w-]+\.md)(?![\w/])"
                  % "|".join(map(re.escape, REPO_DIRS)))
LINK = re.compile(r'(?:!|(?<![\w\])]))\[[^\]]*\]\(([^()\s]+)(?:\s+"[^"]*")?\)')   # [text](target "title")
FENCED = re.compile(r"^ *(```|~~~).*?^ *\1", re.S | re.M)
FILE_SUFFIXES = {"safetensors", "ckpt", "pt", "bin", "png", "json", "npz", "npy", "txt", "log"}


def line_of(text, pos):
    return text.count("\n", 0, pos) + 1


def resolves(name):
    """Whether a dotted name `npsd.a.b` is a module or an attribute chain (`npsd.Pipeline.txt2img`)."""
    parts = name.split(".")
    obj = importlib.import_module(parts[0])
    for i in range(1, len(parts)):
        if hasattr(obj, parts[i]):
            obj = getattr(obj, parts[i])
        elif isinstance(obj, types.ModuleType):
            module = ".".join(parts[: i + 1])
            try:
                obj = importlib.import_module(module)
            except ModuleNotFoundError as e:
                if e.name != module:              # the module exists but needs something missing
                    raise
                return False
        else:
            return False
    return True


def missing_names(text):
    """[(line, name)] for each `npsd.X.Y` name in the text (prose or code) that does not exist.
    A name ending in a file suffix (`npsd.safetensors`, `npsd.png`) is a file name, not checked."""
    return [(line_of(text, m.start()), m.group()) for m in NAME.finditer(text)
            if m.group().rsplit(".", 1)[1] not in FILE_SUFFIXES and not resolves(m.group())]


def missing_paths(text, page_dir):
    """[(line, path)] for each repository path in the text that does not exist.

    The rule for what counts as a repository path, in prose or code:
    - a word starting with one of the repository's folders, `npsd/`, `tests/`, `docs/`, `benchmarks/`,
      `weights/`, `tools/` or `.ci/`, not preceded by `/`, `~` or a word character (so
      `/path/to/docs/x`, `~/models/...` and URLs are not), resolved from the repository root;
    - `images/NAME` and a bare `NAME.md`, resolved from the page's folder (docs/images/, docs/x.md);
    - the target of a markdown link or image `[..](target)` outside fenced code blocks that is not
      a URL (`scheme://`, `mailto:`) or an anchor (`#...`), resolved from the page's folder, its
      `#anchor` dropped (`f[2](x)` with a word before `[` is code, not a link).
    Anything else (`out.png`, `model.safetensors`, `steps/`) is taken for a user's example.
    A trailing `.` (a sentence's end) is not part of a path.
    """
    found = []
    for m in PATH.finditer(text):
        path = m.group(1).rstrip(".")
        base = ROOT if path.split("/")[0] in REPO_DIRS else page_dir
        found.append((line_of(text, m.start()), path, base))
    prose = FENCED.sub(lambda m: "\n" * m.group().count("\n"), text)     # same line numbers
    for m in LINK.finditer(prose):
        target = m.group(1).split("#")[0]
        if target and "://" not in target and not target.startswith("mailto:"):
            found.append((line_of(prose, m.start(1)), target, page_dir))
    return sorted({(line, path) for line, path, base in found if not (base / path).exists()})


# --- markdown tables ----------------------------------------------------------------------------

SEPARATOR = re.compile(r"^\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?$")


def cells(row):
    r"""The number of cells of a table row. As GitHub reads tables, only an escaped `\|` does not
    split a cell: an unescaped `|` splits one even inside a code span or `$...$`."""
    row = row.strip()
    row = row[1:] if row.startswith("|") else row
    row = row[:-1] if row.endswith("|") and not row.endswith("\\|") else row
    return len(re.split(r"(?<!\\)\|", row))


def ragged_table_rows(text):
    """[(line, cells in the header, cells in the row)] for each table row (separator included)
    whose number of cells differs from its header's. Tables inside fenced code blocks are not tables."""
    lines = text.split("\n")
    bad, fence, i = [], False, 0
    while i < len(lines):
        if lines[i].lstrip().startswith(("```", "~~~")):
            fence = not fence
        elif (not fence and lines[i].lstrip().startswith("|") and i + 1 < len(lines)
              and SEPARATOR.match(lines[i + 1].strip())):
            header = cells(lines[i])
            j = i + 1
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                if cells(lines[j]) != header:
                    bad.append((j + 1, header, cells(lines[j])))
                j += 1
            i = j
            continue
        i += 1
    return bad


def test_checks_catch_planted_errors(tmp_path):
    assert missing_names("`npsd.schedulers.add_noise`, `npsd.nn`, `npsd.Pipeline.txt2img`, -o npsd.png.") == []
    assert missing_names("ok `npsd.nn.set_fast`\n`npsd.schedulers.no_such_sampler` and npsd.no_module") == [
        (2, "npsd.schedulers.no_such_sampler"), (2, "npsd.no_module")]
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "cfg.png").write_bytes(b"")
    (tmp_path / "other.md").write_text("")
    good = ("`npsd/pipeline.py`, tests/test_unet.py, docs/make_figures.py.\n![cfg](images/cfg.png) "
            "[other](other.md#top) [web](https://example.com/docs/x.md) -o out.png /path/to/docs/y.md")
    assert missing_paths(good, tmp_path) == []
    bad = ("`npsd/no_such.py`\n![x](images/none.png) see [gone](gone.md) and docs/gone.md.\n"
           "```\ny = f[0](x)  # [a](no.txt)\n```\nthen [a link](after/fence.txt)")
    assert missing_paths(bad, tmp_path) == [(1, "npsd/no_such.py"), (2, "docs/gone.md"), (2, "gone.md"),
                                            (2, "images/none.png"), (6, "after/fence.txt")]
    table = "| a | b |\n|---|---|\n| `x \\| y` | 2 |\n| 1 | 2 | 3 |\n| `p | q` | r |\n\n```\n| a |\n|---|\n| 1 | 2 |\n```"
    assert ragged_table_rows(table) == [(4, 2, 3), (5, 2, 3)]
    assert ragged_table_rows("| a | b |\n|---|---|---|\n| 1 | 2 |") == [(2, 2, 3)]    # the separator too
    assert ragged_table_rows("| a | b |\n| --- | :---: |\n| 1 | 2 |\nnot a row | x") == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_names_exist(page):
    missing = missing_names(page.read_text())
    assert not missing, f"{page.relative_to(ROOT)}: names that do not exist (line, name): {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_paths_exist(page):
    missing = missing_paths(page.read_text(), page.parent)
    assert not missing, f"{page.relative_to(ROOT)}: paths that do not exist (line, path): {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_tables_are_rectangular(page):
    ragged = ragged_table_rows(page.read_text())
    assert not ragged, f"{page.relative_to(ROOT)}: table rows (line, header cells, row cells): {ragged}"


def index_problems(index, pages):
    """(pages not linked from the index text, linked pages not among `pages`), sorted."""
    listed = set(re.findall(r"\]\(([\w-]+\.md)(?:#[\w-]*)?\)", index))
    return sorted(set(pages) - listed), sorted(listed - set(pages))


def test_index_check_catches_planted_errors():
    assert index_problems("1. [a](a.md): one\n2. [b](b.md#top): two", ["a.md", "b.md"]) == ([], [])
    assert index_problems("1. [a](a.md)\n2. [gone](gone.md)", ["a.md", "new.md"]) == (["new.md"], ["gone.md"])


def test_index_lists_every_page():
    pages = [p.name for p in (ROOT / "docs").glob("*.md") if p.name != "README.md"]
    unlisted, missing = index_problems((ROOT / "docs" / "README.md").read_text(), pages)
    assert not unlisted, f"docs pages missing from docs/README.md: {unlisted}"
    assert not missing, f"docs/README.md lists pages that do not exist: {missing}"


def ci_command(readme_dir):
    """The test command as .ci/run reads it from README.md in readme_dir, run by bash with its options."""
    import subprocess

    line = next(s for s in (ROOT / ".ci" / "run").read_text().splitlines() if s.startswith("cmd="))
    script = f'set -euo pipefail\ncd "{readme_dir}"\n{line}\nprintf %s "$cmd"\n'
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True)


def test_ci_reads_the_readme_test_command(tmp_path):
    block = (ROOT / "README.md").read_text().split("<!-- test-command -->", 1)[1]
    shown = re.search(r"python -m pytest[^\n]*", block).group(0)
    assert ci_command(ROOT).stdout == shown
    # A long README after the command: reading it through a pipe into `grep -m1` made .ci/run die of
    # SIGPIPE (exit 141) under pipefail whenever grep exited first; 1 MB makes that certain.
    (tmp_path / "README.md").write_text((ROOT / "README.md").read_text() + "padding line\n" * 80_000)
    run = ci_command(tmp_path)
    assert (run.returncode, run.stdout) == (0, shown), run.stderr
