"""Kronecker-factor strategies behind one interface (:class:`KroneckerFactor`), chosen by name.

Adding a strategy = one module with a :class:`KroneckerFactor` subclass and one entry in
:data:`STRATEGIES`.
"""

from __future__ import annotations

from typing import Any

from .base import DenseFactor, FactorRefreshError, FactorUpdate, KroneckerFactor, update_factors
from .cholesky import CholeskyFactor
from .eigh import EighFactor
from .kronecker import (
    Direction,
    kronecker_matvec,
    precondition,
    refresh_pair,
    solve,
    split_damping,
)
from .projected import ProjectedFactor
from .recursive import RecursiveFactor

STRATEGIES: dict[str, type[KroneckerFactor]] = {
    EighFactor.name: EighFactor,
    CholeskyFactor.name: CholeskyFactor,
    RecursiveFactor.name: RecursiveFactor,
    ProjectedFactor.name: ProjectedFactor,
}


def make_factor(strategy: str, dim: int, **options: Any) -> KroneckerFactor:
    """A new factor of the named strategy (``ValueError`` listing the accepted names otherwise)."""
    if strategy not in STRATEGIES:
        raise ValueError(
            f"factors={strategy!r} is not a known strategy; accepted values: {sorted(STRATEGIES)}"
        )
    return STRATEGIES[strategy].create(dim, **options)


__all__ = [
    "STRATEGIES",
    "KroneckerFactor",
    "DenseFactor",
    "FactorRefreshError",
    "EighFactor",
    "CholeskyFactor",
    "RecursiveFactor",
    "ProjectedFactor",
    "make_factor",
    "update_factors",
    "FactorUpdate",
    "precondition",
    "solve",
    "Direction",
    "refresh_pair",
    "split_damping",
    "kronecker_matvec",
]
