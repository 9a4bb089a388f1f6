"""``natgrad reproduce``: regenerate every table and figure of docs/RESULTS.md from scratch.

* :mod:`.settings` — what each part runs in the full / quick / tiny modes, and the estimate;
* :mod:`.parts` — the parts, each returning a JSON-ready document;
* :mod:`.markdown` — RESULTS.md from those documents (pure functions);
* :mod:`.runner` — runs the parts and writes ``results/*.json``, ``figures/*.png``, RESULTS.md.
"""

from __future__ import annotations

from .runner import reproduce
from .settings import MODES, PART_TITLES, PARTS, Settings

__all__ = ["MODES", "PARTS", "PART_TITLES", "Settings", "reproduce"]
