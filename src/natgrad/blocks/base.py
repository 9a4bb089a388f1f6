"""The curvature of one layer's parameters: statistics in, damped solves out.

A :class:`CurvatureBlock` is what the curvature engine (:mod:`natgrad.curvature`) keeps per
preconditioned layer. The engine hands it the layer's :class:`LayerStatistics`, asks it to refresh
its inverse for a damping, and to solve the damped system for the layer's gradient; the analysis
multiplies with it. Its state lives in :attr:`CurvatureBlock.factors` (objects with the
:class:`~natgrad.factors.KroneckerFactor` state interface), so checkpoints and distributed
broadcasts treat every block alike.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from torch import Tensor

from ..factors import Direction, FactorUpdate, KroneckerFactor


@dataclass
class LayerStatistics:
    """Kronecker statistics of one layer for one step: ``Â = a_scale·aᵀa``, ``Ĝ = g_scale·gᵀg``.

    Every statistic is given as rows ``X`` (``(n, d)``) and a scale ``s`` so that the batch
    estimate is ``s · Xᵀ X`` (docs/DESIGN.md, "Statistics and scaling"); a distributed reduction
    may replace the rows of one side by their dense moment ``Xᵀ X`` (``a_moment`` / ``g_moment``).

    Attributes:
        a, g: rows ``(n_a, d_A)`` and ``(n_g, d_G)`` (or ``(d, d)`` moments, see ``*_moment``).
        a_scale, g_scale: their weights in the batch estimates.
        samples: the samples ``m`` they were computed from.
        a_sq, g_sq: ``‖a‖_F²`` and ``‖g‖_F²`` once known (the optimizer's finiteness check
            computes them and the factors reuse them as traces).
        a_moment, g_moment: the side holds the dense moment ``Σ_r X_rᵀ X_r`` instead of rows.
        a_diagonal: ``a`` holds rows whose column sums are the diagonal of an exactly diagonal
            ``Σ āāᵀ`` (one-hot inputs, e.g. token counts), not the rows ``ā``.
    """

    a: Tensor
    a_scale: float
    g: Tensor
    g_scale: float
    samples: int
    a_sq: float | None = None
    g_sq: float | None = None
    a_moment: bool = False
    g_moment: bool = False
    a_diagonal: bool = False


class CurvatureBlock(ABC):
    """One layer's curvature (see the module docstring)."""

    #: the state-holding parts, e.g. ``(A, G)``; each has the KroneckerFactor state interface
    factors: tuple[KroneckerFactor, ...]

    @abstractmethod
    def stage(self, stats: LayerStatistics, decay: float) -> list[FactorUpdate]:
        """Take the step's statistics: return the row updates the engine applies in one batch
        (:func:`~natgrad.factors.update_factors`), applying any other kind (moments) directly."""

    @property
    def refreshed(self) -> bool:
        """Whether :meth:`solve` can be used (every part refreshed at least once)."""
        return all(f.refreshed for f in self.factors)

    @abstractmethod
    def refresh(self, damping: float) -> None:
        """Refresh the inverse representation for the layer damping ``λ``
        (:class:`~natgrad.factors.FactorRefreshError` on failure, previous state kept)."""

    @abstractmethod
    def solve(self, blocks: list[Tensor], damping: float,
              norm2: Tensor | None = None) -> Direction:
        """The damped natural-gradient direction for the gradient's column blocks ``blocks``
        (those of :meth:`natgrad.layers.LayerHelper.matrix_blocks`); ``norm2`` = ``‖V‖²`` if
        known."""

    @classmethod
    def solve_many(cls, requests: list[tuple[CurvatureBlock, list[Tensor], float,
                                             Tensor | None]]) -> list[Direction]:
        """:meth:`solve` for several blocks of this type (``(block, blocks, λ, ‖V‖²)`` each),
        in order; a type may override it to solve equal-shaped blocks in one batched call."""
        return [b.solve(blocks, damping, norm2) for b, blocks, damping, norm2 in requests]

    @abstractmethod
    def matvec(self, V: Tensor) -> Tensor:
        """The block (as represented) applied to a ``(d_G, d_A)`` matrix ``V``."""

    @abstractmethod
    def diagonal(self) -> Tensor:
        """The block's diagonal as a ``(d_G, d_A)`` matrix."""

    def cost(self) -> float:
        """Relative cost of one update plus refresh (for the distributed assignment)."""
        return sum(f.cost() for f in self.factors)

    def state_bytes(self) -> int:
        """Bytes of the block's state."""
        return sum(f.state_bytes() for f in self.factors)

    @property
    @abstractmethod
    def size(self) -> int:
        """The number of parameters the block covers."""

    @abstractmethod
    def top_eigenvalues(self, k: int) -> Tensor:
        """The ``k`` largest eigenvalues of the block as represented (descending, float64)."""

    @abstractmethod
    def trace(self) -> float:
        """``tr`` of the block."""

    @abstractmethod
    def logdet(self, damping: float) -> float:
        """``log det(B + λ I)``."""

    @abstractmethod
    def describe(self) -> str:
        """A label for summaries (static: the distributed fingerprint hashes it)."""

    def summary(self) -> str:
        """:meth:`describe` plus what was chosen at run time (e.g. ranks)."""
        return self.describe()
