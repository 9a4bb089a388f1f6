"""Assigning the expensive per-layer work (factor refreshes / updates) to ranks by estimated cost.

The cost of a layer is what its curvature block says (:meth:`CurvatureBlock.cost`, the sum of
its factors' :meth:`KroneckerFactor.cost`): every strategy owns its estimate, so a new strategy
needs no entry here. Work is assigned with greedy longest-processing-time (LPT): layers in
decreasing cost, each to the currently least-loaded rank. LPT is within 4/3 of the optimal
makespan and, being deterministic, gives the same answer on every rank without communication.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def factor_cost(factor: Any) -> float:
    """Estimated cost of refreshing (and, for row-based strategies, updating) one factor."""
    return float(factor.cost())


def assign_lpt(
    costs: Mapping[str, float] | Sequence[tuple[str, float]], world: int
) -> dict[str, int]:
    """Greedy longest-processing-time assignment of named jobs to ``world`` ranks.

    Args:
        costs: job name → estimated cost (a mapping, or ``(name, cost)`` pairs; the order breaks
            ties, so every rank must pass the same order).
        world: number of ranks (≥ 1).

    Returns:
        job name → rank; every job appears exactly once. Ties (equal cost, equal load) go to the
        earlier job and the lower rank, so the result is deterministic.
    """
    if world < 1:
        raise ValueError(f"world must be a positive integer, got {world}")
    items = list(costs.items()) if isinstance(costs, Mapping) else list(costs)
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise ValueError("job names must be unique")
    for name, cost in items:
        if not cost >= 0:
            raise ValueError(f"cost of {name!r} must be >= 0, got {cost}")
    order = sorted(range(len(items)), key=lambda i: (-items[i][1], i))
    load = [0.0] * world
    owner: dict[str, int] = {}
    for i in order:
        r = min(range(world), key=lambda j: (load[j], j))
        owner[items[i][0]] = r
        load[r] += items[i][1]
    return {n: owner[n] for n in names}


def loads(owner: Mapping[str, int], costs: Mapping[str, float], world: int) -> list[float]:
    """Total assigned cost per rank (for reports and tests)."""
    out = [0.0] * world
    for name, r in owner.items():
        out[r] += costs[name]
    return out
