"""Plain-text tables for the terminal."""
from __future__ import annotations


def text_table(cells: list[list[str]], left_columns: int = 1) -> list[str]:
    """Aligned lines of a header row plus body rows, a rule under the header; the first `left_columns`
    columns are left-aligned (names), the rest right-aligned (numbers)."""
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) if i < left_columns else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    return lines
