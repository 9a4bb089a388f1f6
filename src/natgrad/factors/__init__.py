"""Kronecker-factor strategies behind one interface (:class:`KroneckerFactor`), chosen by name.

Adding a strategy = one module with a :class:`KroneckerFactor` subclass (its ``Options``
dataclass, ``cost``, state and refresh) and one call of :func:`register_strategy`; the optimizer,
the analysis, the distributed coordinator, the CLI and the benches read the registry.
"""

from __future__ import annotations

from .base import (
    FACTOR_DTYPES,
    DecomposedFactor,
    DenseFactor,
    FactorRefreshError,
    FactorUpdate,
    KroneckerFactor,
    update_factors,
)
from .cholesky import CholeskyFactor
from .diagonal import DiagonalFactor
from .eigh import EighFactor
from .kronecker import (
    Direction,
    kronecker_matvec,
    precondition,
    refresh_pair,
    solve,
    solve_many,
    split_damping,
)
from .options import FactorOptions
from .projected import ProjectedFactor, ProjectedOptions
from .recursive import RecursiveFactor, RecursiveOptions
from .registry import (
    STRATEGIES,
    get_strategy,
    make_factor,
    register_strategy,
    strategy_options,
    unregister_strategy,
)

for _cls in (EighFactor, CholeskyFactor, RecursiveFactor, ProjectedFactor):
    register_strategy(_cls)

__all__ = [
    "FACTOR_DTYPES",
    "STRATEGIES",
    "CholeskyFactor",
    "DecomposedFactor",
    "DenseFactor",
    "DiagonalFactor",
    "Direction",
    "EighFactor",
    "FactorOptions",
    "FactorRefreshError",
    "FactorUpdate",
    "KroneckerFactor",
    "ProjectedFactor",
    "ProjectedOptions",
    "RecursiveFactor",
    "RecursiveOptions",
    "get_strategy",
    "kronecker_matvec",
    "make_factor",
    "precondition",
    "refresh_pair",
    "register_strategy",
    "solve",
    "solve_many",
    "split_damping",
    "strategy_options",
    "unregister_strategy",
    "update_factors",
]
