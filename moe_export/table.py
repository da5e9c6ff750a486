"""Plain-text tables for the command line: each column as wide as its widest cell or header, two spaces apart,
so no header runs into its neighbour and every header sits over its own cells."""

from __future__ import annotations

from typing import Sequence


def format_table(head: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> list[str]:
    """Header, a rule and one line per row. ``align``: one letter per column, ``l`` (text) or ``r`` (numbers;
    the header is right-aligned with them)."""
    if len(align) != len(head) or any(len(r) != len(head) for r in rows):
        raise ValueError(f"format_table: {len(head)} headers, align {align!r}, row lengths {sorted({len(r) for r in rows})}")
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]

    def line(cells) -> str:
        return "  ".join(str(c).ljust(w) if a == "l" else str(c).rjust(w) for c, w, a in zip(cells, widths, align)).rstrip()

    top = line(head)
    return [top, "-" * len(top)] + [line(r) for r in rows]
