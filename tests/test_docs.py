"""The documentation against the repository: README.md stays a short user's guide, its reading-order table gives each
file's true line count, every relative link in README.md and docs/ leads to a file (and a heading) that exists, and
neither the docs nor the code comments tell the project's history (that lives in git)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
MARKDOWN = [README, *sorted((ROOT / "docs").rglob("*.md"))]
README_MAX_LINES = 320
HISTORY = re.compile(r"\bissue [0-9]+|for the record|\bbranch [a-z]+[0-9]+|the default then", re.IGNORECASE)

FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where a bracket or parenthesis is not a link."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its rendered text lowercased, punctuation other than - and _ dropped, each space
    a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = text.replace("`", "").replace("*", "").lower()
    return "".join(c for c in text if c.isalnum() or c in "-_ ").replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a markdown file; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text())):
        base = slug(heading)
        n = seen.get(base, 0)
        out.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return out


def test_slug_follows_githubs_rule():
    assert slug("The demo (`make demo`), measured") == "the-demo-make-demo-measured"
    assert slug("The paper's equations on the demo") == "the-papers-equations-on-the-demo"
    assert slug("Options of `python -m ref.unlearn`") == "options-of-python--m-refunlearn"
    assert slug("A [linked](x.md) heading_name") == "a-linked-heading_name"


def test_the_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; keep it a guide of at most {README_MAX_LINES}"


def reading_order() -> list[tuple[str, int]]:
    """(file, line count) of each row of the README's reading-order table: | # | `ref/x.py` | lines | ... |."""
    rows = re.findall(r"^\|\s*\d+\s*\|\s*`([^`]+)`\s*\|\s*(\d+)\s*\|", README.read_text(), re.MULTILINE)
    return [(path, int(n)) for path, n in rows]


def test_the_reading_order_line_counts_are_the_files():
    rows = reading_order()
    assert len(rows) == 8, f"the reading-order table should list the eight spec files, found {rows}"
    counted = {p: (ROOT / p).read_bytes().count(b"\n") if (ROOT / p).is_file() else None for p, _ in rows}
    wrong = {p: (n, counted[p]) for p, n in rows if counted[p] != n}
    assert not wrong, f"README.md reading order: (stated, wc -l) differ for {wrong}; update the lines column"


@pytest.mark.parametrize("doc", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file_and_heading(doc):
    broken = []
    for target in LINK.findall(prose(doc.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading with that anchor in {dest.relative_to(ROOT)})")
    assert not broken, f"{doc.relative_to(ROOT)}: broken links: {broken}"


def test_no_history_in_the_docs_or_the_code():
    files = MARKDOWN + sorted((ROOT / "ref").rglob("*.py"))
    found = [
        f"{p.relative_to(ROOT)}:{i}: {m.group(0)!r}"
        for p in files
        for i, line in enumerate(p.read_text().splitlines(), start=1)
        for m in [HISTORY.search(line)]
        if m
    ]
    assert not found, f"history belongs in git, not in the docs or comments: {found}"
