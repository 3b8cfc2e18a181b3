"""Markdown formatting shared by the benchmark's reports (``report.py``, ``report_delivery.py``)."""

from __future__ import annotations


def num(value: float | None, digits: int = 0) -> str:
    """A number with thousands separators, or ``-`` when unknown."""
    return "-" if value is None else f"{value:,.{digits}f}"


def ratio(a: float | None, b: float | None, digits: int = 1) -> str:
    """``a ÷ b`` as ``1.5x``, or ``-`` when either is unknown or ``b`` is 0."""
    return "-" if a is None or b is None or b == 0 else f"{a / b:,.{digits}f}x"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines: the first column left-aligned, the others right-aligned."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|",
    ]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]
