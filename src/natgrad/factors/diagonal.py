"""A diagonal factor ``F = diag(f)``: exact for inputs that are one-hot (embedding tokens), where
``Xᵀ X`` is the diagonal matrix of token counts; ``O(d)`` memory and work, never ``d²``.

It is not a strategy a user picks for a whole network (it is not registered): layer helpers
whose input factor is exactly diagonal (:mod:`natgrad.layers.embedding`) ask for it, and the
Kronecker solve (:func:`natgrad.factors.kronecker.solve`) treats it in closed form.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..norms import all_finite
from .base import FactorRefreshError, KroneckerFactor


class DiagonalFactor(KroneckerFactor):
    """``F = diag(f)``, ``f ← keep · f + w · Σ_rows x²`` (column sums of squares).

    Updated from rows ``(n, d)`` (only their squared column sums matter) or from the diagonal
    itself with :meth:`update_diagonal` (e.g. token counts from ``torch.bincount``).
    """

    name = "diagonal"
    diagonal = True
    state_keys = ("f",)
    statistics_keys = ("f",)

    def __init__(self, dim: int, options: Any = None, **kwargs: Any) -> None:
        super().__init__(dim, options, **kwargs)
        self.f = torch.zeros(self.dim, dtype=self.dtype, device=self.device)

    def _update(self, rows: Tensor, new_weight: float, keep: float,
                sq_norm: float | None = None) -> None:
        self._update_diag(rows.square().sum(0), new_weight, keep)

    def update_diagonal(self, diag: Tensor, scale: float, decay: float) -> None:
        """The EMA update with the batch statistics ``scale · diag(diag)`` (``diag``: ``(d,)``)."""
        if diag.shape != (self.dim,):
            raise ValueError(f"diag must have shape ({self.dim},), got {tuple(diag.shape)}")
        self._ema(self._update_diag, diag.to(device=self.device, dtype=self.dtype), scale, decay)

    def _update_diag(self, diag: Tensor, new_weight: float, keep: float) -> None:
        self.f = torch.add(self.f * keep, diag, alpha=new_weight)

    def trace(self) -> float:
        return float(self.f.sum())

    def refresh(self, damping: float) -> None:
        """Nothing to decompose; only a finite diagonal is accepted."""
        if not all_finite([self.f]):
            raise FactorRefreshError(f"diagonal factor (d={self.dim}): non-finite entries")
        self.damping = float(damping)
        self.refreshed = True

    def diag(self) -> Tensor:
        """``f``: the ``(d,)`` diagonal."""
        return self.f

    def inv_matmul(self, v: Tensor) -> Tensor:
        return v / (self.f + self.damping).unsqueeze(-1)

    def to_dense(self) -> Tensor:
        return torch.diag(self.f)

    def eigenvalues(self) -> Tensor:
        return self.f.sort(descending=True).values

    def cost(self) -> float:
        return float(self.dim)
