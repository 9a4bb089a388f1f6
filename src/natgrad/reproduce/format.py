"""Number and table formatting for docs/RESULTS.md (pure functions, no I/O).

Numbers have 3 significant digits (standard deviations 2); ``None`` / NaN print as ``–``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

DASH = "–"


def num(value: Any, digits: int = 3) -> str:
    """``0.97123`` → ``0.971``, ``1234.5`` → ``1,234``, ``None``/NaN → ``–``; ints as they are."""
    if value is None or isinstance(value, bool):
        return DASH if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not isinstance(value, float) or not math.isfinite(value):
        return DASH if isinstance(value, float) else str(value)
    if value == 0:
        return "0"
    if abs(value) >= 10 ** digits:
        return f"{value:,.0f}"
    text = f"{value:.{digits}g}"
    if "e" in text:
        mantissa, exp = text.split("e")
        return f"{mantissa}e{int(exp)}"
    return text


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """Mean and sample standard deviation (``None`` with fewer than 2) of the finite values."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return None, None, 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None), len(xs)


def pm(values: Sequence[float | None], scale: float = 1.0, suffix: str = "") -> str:
    """``mean ± std`` (just the mean for one value, ``–`` for none) of ``scale``·values."""
    mean, std, n = mean_std(values)
    if mean is None:
        return DASH
    text = num(mean * scale)
    if std is not None:
        text += f" ± {num(std * scale, 2)}"
    return text + suffix


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
             align: str | None = None) -> str:
    """A GitHub markdown table; cells that are not strings go through :func:`num`. ``align``:
    one letter per column, ``l`` or ``r`` (default: first left, others right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule) + " |"]
    for row in rows:
        cells = [c if isinstance(c, str) else num(c) for c in row]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def figure(path: str, alt: str) -> str:
    return f"![{alt}]({path})"


def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference``, ``None`` when either is missing or the reference is not positive."""
    if value is None or reference is None or not reference > 0:
        return None
    return value / reference


