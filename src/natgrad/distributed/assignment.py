"""Assigning the expensive per-layer work (factor refreshes / updates) to ranks by estimated cost.

The cost model is a table keyed by strategy name (one entry per strategy, like the strategies
themselves); unknown strategies fall back to the dense ``d³``. Work is assigned with greedy
longest-processing-time (LPT): layers in decreasing cost, each to the currently least-loaded rank.
LPT is within 4/3 of the optimal makespan and, being deterministic, gives the same answer on every
rank without communication.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

#: ``cost(dim, factor) -> float`` per strategy name (relative flop counts, not seconds)
CostModel = Callable[[int, Any], float]


def _int_attr(factor: Any, names: tuple[str, ...], default: int) -> int:
    for attr in names:
        value = getattr(factor, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


def _projected(dim: int, factor: Any) -> float:
    r = min(_int_attr(factor, ("rank_cap", "rank"), 64), dim)
    k = _int_attr(factor, ("sketch_size",), max(1, r // 2))
    return float(dim) * (r + k) ** 2  # Rayleigh–Ritz on orth([U, X]), linear in d


def _recursive(dim: int, factor: Any) -> float:
    k = _int_attr(factor, ("sketch_size",), dim)
    return float(dim) ** 2 * min(k, dim)  # Woodbury, O(d² k); exact refreshes amortised


COSTS: dict[str, CostModel] = {
    "eigh": lambda d, f: float(d) ** 3,
    "cholesky": lambda d, f: float(d) ** 3 / 3.0,
    "projected": _projected,
    "recursive": _recursive,
}


def factor_cost(factor: Any) -> float:
    """Estimated cost of refreshing (and, for row-based strategies, updating) one factor."""
    dim = int(factor.dim)
    model = COSTS.get(getattr(factor, "name", ""), lambda d, f: float(d) ** 3)
    return model(dim, factor)


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
