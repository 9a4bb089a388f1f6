"""Dense eigendecomposition ``F = Q diag(λ) Qᵀ`` (the K-FAC default): ``O(d³)`` per refresh."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import DenseFactor


class EighFactor(DenseFactor):
    name = "eigh"
    spectral = True
    state_keys = ("F", "Q", "lam")

    def __init__(self, dim: int, options: Any = None, **kwargs: Any) -> None:
        super().__init__(dim, options, **kwargs)
        self.Q = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        self.lam = torch.zeros(self.dim, dtype=self.dtype, device=self.device)

    def _compute_inverse(self, damping: float, dtype: torch.dtype) -> dict[str, Any]:
        lam, Q = torch.linalg.eigh(self.F.to(dtype))
        return {"Q": Q.flip(1), "lam": lam.flip(0).clamp_min(0.0)}

    def eigen(self) -> tuple[Tensor, Tensor, float]:
        return self.Q, self.lam, 0.0

    def inv_matmul(self, v: Tensor) -> Tensor:
        return self.Q @ ((self.Q.T @ v) / (self.lam + self.damping).unsqueeze(-1))

    def eigenvalues(self) -> Tensor:
        return self.lam

    def cost(self) -> float:
        return float(self.dim) ** 3  # the dense eigh dominates
