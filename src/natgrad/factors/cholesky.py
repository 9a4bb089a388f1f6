"""Cholesky inverse ``(F + δ I)⁻¹`` for π-split damping: ``O(d³/3)`` per refresh."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import DenseFactor


class CholeskyFactor(DenseFactor):
    name = "cholesky"
    state_keys = ("F", "P")

    def __init__(self, dim: int, options: Any = None, **kwargs: Any) -> None:
        super().__init__(dim, options, **kwargs)
        self.P = torch.eye(self.dim, dtype=self.dtype, device=self.device)

    def _compute_inverse(self, damping: float, dtype: torch.dtype) -> dict[str, Any]:
        eye = torch.eye(self.dim, dtype=dtype, device=self.device)
        L = torch.linalg.cholesky(self.F.to(dtype) + damping * eye)
        return {"P": torch.cholesky_inverse(L)}

    def inv_matmul(self, v: Tensor) -> Tensor:
        return self.P @ v

    def cost(self) -> float:
        return float(self.dim) ** 3 / 3.0
