"""Plain-text tables for results (no dependency beyond the standard library)."""

from __future__ import annotations

from collections.abc import Sequence


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    if any(header):
        lines.insert(1, "  ".join("-" * w for w in widths))
    else:
        lines.pop(0)
    return "\n".join(lines)
