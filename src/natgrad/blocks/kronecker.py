"""The Kronecker-factored block ``A ⊗ G`` of Linear, Conv2d and Embedding layers (K-FAC)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..factors import (
    Direction,
    FactorUpdate,
    KroneckerFactor,
    kronecker_matvec,
    refresh_pair,
    solve,
    solve_many,
)
from .base import CurvatureBlock, LayerStatistics
from .closed_forms import kron_logdet, kron_top_eigenvalues, kron_trace


def _diag(f: KroneckerFactor) -> Tensor:
    return f.diag() if f.diagonal else f.dense_diagonal()


def _label(f: KroneckerFactor) -> str:
    state = f.state_summary()
    return f"{f.describe()} [{state}]" if state else f.describe()


class KroneckerBlock(CurvatureBlock):
    """``F_ℓ ≈ A ⊗ G`` with factors of any strategy (``A``: ``d_A × d_A``, ``G``: ``d_G × d_G``)."""

    def __init__(self, A: KroneckerFactor, G: KroneckerFactor) -> None:
        self.A, self.G = A, G
        self.factors = (A, G)

    def stage(self, stats: LayerStatistics, decay: float) -> list[FactorUpdate]:
        items = []
        if stats.a_diagonal:
            self.A.update_diagonal(stats.a.sum(0), stats.a_scale, decay)
        for factor, rows, scale, sq, moment in (
            (self.A, stats.a, stats.a_scale, stats.a_sq, stats.a_moment),
            (self.G, stats.g, stats.g_scale, stats.g_sq, stats.g_moment),
        )[int(stats.a_diagonal):]:
            if moment:
                factor.update_moment(rows, scale, decay)
            else:
                items.append(FactorUpdate(factor, rows, scale, sq))
        return items

    def refresh(self, damping: float) -> None:
        if self.A.updates == 0 or self.G.updates == 0:
            return  # no statistics yet (e.g. the update was skipped): nothing to invert
        refresh_pair(self.A, self.G, damping)

    def solve(self, blocks: list[Tensor], damping: float,
              norm2: Tensor | None = None) -> Direction:
        return solve(blocks, self.A, self.G, damping, norm2)

    @classmethod
    def solve_many(cls, requests: list[tuple[CurvatureBlock, list[Tensor], float,
                                             Tensor | None]]) -> list[Direction]:
        """Equal-shaped pairs in one batched product (:func:`natgrad.factors.solve_many`)."""
        return solve_many([(blocks, b.A, b.G, damping, norm2)  # type: ignore[attr-defined]
                           for b, blocks, damping, norm2 in requests])

    def matvec(self, V: Tensor) -> Tensor:
        return kronecker_matvec(V, self.A, self.G)

    def diagonal(self) -> Tensor:
        return torch.outer(_diag(self.G), _diag(self.A))

    @property
    def size(self) -> int:
        return self.A.dim * self.G.dim

    def top_eigenvalues(self, k: int) -> Tensor:
        return kron_top_eigenvalues(self.A, self.G, k)

    def trace(self) -> float:
        return kron_trace(self.A, self.G)

    def logdet(self, damping: float) -> float:
        return kron_logdet(self.A, self.G, damping)

    def describe(self) -> str:
        return f"A: {self.A.describe()}  G: {self.G.describe()}"

    def summary(self) -> str:
        return f"A: {_label(self.A)}  G: {_label(self.G)}"
