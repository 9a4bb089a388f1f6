"""The parts of ``natgrad reproduce``: each runs natgrad's library functions in this process
(:mod:`.training`, :mod:`.curvature`) and returns a JSON-ready document; exceptions propagate to
the runner, which reports the part as failed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .capacity import run_capacity
from .context import Context, PartUnavailable, available_optimizers
from .curvature import run_analysis, run_scaling, run_stability
from .families import run_convergence, run_families, run_steps
from .peers import run_peers
from .race import run_race
from .training import WIDE_VARIANTS, compare, run_parity, run_timing, run_wide


def run_discussion(ctx: Context) -> dict[str, Any]:
    """docs/DISCUSSION.md, verbatim."""
    path = ctx.discussion
    if path is None or not path.is_file():
        raise PartUnavailable(f"{path or 'docs/DISCUSSION.md'} not found")
    return {"path": str(path), "text": path.read_text()}


RUNNERS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "parity": run_parity,
    "timing": run_timing,
    "scaling": run_scaling,
    "capacity": run_capacity,
    "stability": run_stability,
    "analysis": run_analysis,
    "peers": run_peers,
    "families": run_families,
    "steps": run_steps,
    "convergence": run_convergence,
    "race": run_race,
    "discussion": run_discussion,
}

__all__ = ["RUNNERS", "WIDE_VARIANTS", "Context", "PartUnavailable", "available_optimizers",
           "compare", "run_wide"]
