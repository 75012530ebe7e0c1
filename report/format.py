"""How results read: plain-text tables and the few number formats every table shares.

Standard library only, so that every layer (the runtime's `info` and `generate`, the exporter, the benchmarks, the
demo) can print with it and none has to import upward for it.
"""

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


def ratio_text(ratio: float, low: float, high: float) -> str:
    """A ratio as every table prints it: '6.43x (6.14-7.22)', its 95% interval in brackets."""
    return f"{ratio:.2f}x ({low:.2f}-{high:.2f})"


def figure_text(key: str, value: float | int | str) -> str:
    """A figure of a check as a person reads it: shares (agreement, identical) as percentages, differences in
    scientific notation, metrics in points (0-100) with two decimals, counts and words as they are."""
    if isinstance(value, str | int):  # words, counts (and booleans)
        return str(value)
    if any(word in key for word in ("agreement", "identical")):
        return f"{value:.2%}"
    if any(word in key for word in ("diff", "error")):
        return f"{value:.2e}"
    return f"{value:.2f}"
