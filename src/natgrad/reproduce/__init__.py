"""``natgrad reproduce``: regenerate every table and figure of docs/RESULTS.md from scratch.

* :mod:`.settings` — what each part runs in the full / quick / tiny modes, and the estimate;
* :mod:`.parts` — the parts, each returning a JSON-ready document;
* :mod:`.markdown` — RESULTS.md from those documents (pure functions);
* :mod:`.runner` — runs the parts and writes ``results/*.json``, ``figures/*.png``, RESULTS.md.

The settings (:data:`PARTS`, :data:`MODES`) load without torch, for the command line's help;
:func:`reproduce` (and the runner with it) is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .settings import MODES, PART_TITLES, PARTS, Settings

if TYPE_CHECKING:  # pragma: no cover - imported lazily by __getattr__
    from .runner import reproduce

__all__ = ["MODES", "PARTS", "PART_TITLES", "Settings", "reproduce"]


def __getattr__(name: str) -> Any:
    if name == "reproduce":
        from .runner import reproduce

        return reproduce
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
