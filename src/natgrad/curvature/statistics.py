"""The Fisher kinds, and what a capture hands to the curvature (:class:`LayerStatistics`)."""

from __future__ import annotations

from ..blocks import LayerStatistics

#: the one Fisher vocabulary of the optimizer, the analysis and the operators
FISHER_TYPES = ("mc", "empirical", "exact")

def check_fisher(fisher: object, argument: str = "fisher") -> str:
    """``fisher`` if it is one of :data:`FISHER_TYPES`, else ``ValueError`` naming the argument
    and the accepted values (``"exact"`` is the type-2 Fisher, ``E[Jᵀ H J]``)."""
    if not isinstance(fisher, str) or fisher not in FISHER_TYPES:
        raise ValueError(f"invalid {argument}={fisher!r}: accepted values: {list(FISHER_TYPES)}")
    return fisher


#: the name the statistics had before the curvature engine (``natgrad.capture.Statistics``)
Statistics = LayerStatistics

__all__ = ["FISHER_TYPES", "LayerStatistics", "Statistics", "check_fisher"]
