"""Markdown tables, the one way ref writes them: summary.md, attack.md, sweep.md, table1.md, the options table."""

from __future__ import annotations

from collections.abc import Sequence


def cell(value, digits: int = 3) -> str:
    """A table cell: "-" when missing, text as it is, a whole number as it is, another number with `digits` decimals,
    a list as a/b/c."""
    if value is None:
        return "-"
    if isinstance(value, str | int):
        return str(value)
    if isinstance(value, list | tuple):
        return "/".join(cell(v, digits) for v in value)
    return f"{value:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """The header, the rule and one line a row, each value through `cell`; no newline at the end."""
    rule = "|" + "---|" * len(header)
    return "\n".join([row(header), rule, *map(row, rows)])


def row(values: Sequence) -> str:
    return "| " + " | ".join(map(cell, values)) + " |"
