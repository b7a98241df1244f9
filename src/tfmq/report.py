"""Tables for people: aligned text for the terminal, Markdown for README and benchmark files."""

from __future__ import annotations

from collections.abc import Sequence


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return "-" if value is None else str(value)


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None, markdown: bool = False) -> str:
    """Rows of dicts as an aligned text table (or a Markdown table), columns in the given order."""
    columns = list(columns or dict.fromkeys(key for row in rows for key in row))
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])
    widths = [max(len(column), *(len(row[i]) for row in cells)) for i, column in enumerate(columns)]
    line = lambda values: "  ".join(value.rjust(width) for value, width in zip(values, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * width for width in widths])] + [line(row) for row in cells])
