"""Diagonal estimators: exact (operators with ``diagonal()``) and Hutchinson-style."""

from __future__ import annotations

import math

import torch

from .base import LinearOperator
from .results import DiagonalEstimate
from .trace import rademacher


def exact_diagonal(op: LinearOperator) -> DiagonalEstimate:
    """``diag F`` ``(P,)`` from the operator's exact ``diagonal()``."""
    if not hasattr(op, "diagonal"):
        raise ValueError(f"{type(op).__name__} has no exact diagonal; use hutchinson_diagonal")
    d = op.diagonal()
    return DiagonalEstimate(d, torch.zeros_like(d), 0, exact=True)


def hutchinson_diagonal(op: LinearOperator, probes: int = 32, seed: int = 0,
                        batch: int = 8) -> DiagonalEstimate:
    """``mean_i vᵢ ⊙ F vᵢ`` with Rademacher ``vᵢ`` (Bekas et al. 2007); elementwise stderr."""
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(op.dim, dtype=torch.float64, device=op.device)
    sq = torch.zeros_like(total)
    for s in range(0, probes, batch):
        V = rademacher(op.dim, min(batch, probes - s), gen, op.dtype).to(op.device)
        X = (V * (op @ V)).double()
        total += X.sum(1)
        sq += X.pow(2).sum(1)
    mean = total / probes
    var = (sq / probes - mean.pow(2)).clamp_min(0) * probes / max(probes - 1, 1)
    return DiagonalEstimate(mean.to(op.dtype), (var / probes).sqrt().to(op.dtype)
                            if probes > 1 else torch.full_like(mean, math.inf), probes)
