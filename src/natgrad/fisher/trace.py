"""Trace estimators: exact (from an operator's exact diagonal), Hutchinson and Hutch++."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import LinearOperator
from .results import Estimate


def rademacher(dim: int, k: int, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """``(dim, k)`` of ±1."""
    return (torch.randint(0, 2, (dim, k), generator=generator) * 2 - 1).to(dtype)


def exact_trace(op: LinearOperator) -> Estimate:
    """``tr F`` from the operator's exact ``diagonal()`` (for the exact Fisher:
    ``(1/N) Σ_n ‖B_n J_n‖_F²`` with ``C`` backward passes per sample)."""
    if not hasattr(op, "diagonal"):
        raise ValueError(f"{type(op).__name__} has no exact diagonal; use hutchinson_trace")
    return Estimate(float(op.diagonal().double().sum()), 0.0, 0, exact=True)


def _mean_stderr(x: Tensor) -> tuple[float, float]:
    n = x.numel()
    std = float(x.double().std()) if n > 1 else math.inf
    return float(x.double().mean()), std / math.sqrt(n)


def hutchinson_trace(op: LinearOperator, probes: int = 32, seed: int = 0,
                     batch: int = 8) -> Estimate:
    """``mean_i vᵢᵀ F vᵢ`` with Rademacher ``vᵢ``; ``stderr`` = sample std / √probes."""
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for s in range(0, probes, batch):
        V = rademacher(op.dim, min(batch, probes - s), gen, op.dtype).to(op.device)
        samples.append((V * (op @ V)).sum(0))
    m, se = _mean_stderr(torch.cat(samples))
    return Estimate(m, se, probes)


def hutchpp_trace(op: LinearOperator, matvecs: int = 30, seed: int = 0) -> Estimate:
    """Hutch++ (Meyer et al. 2021) with ``matvecs`` products split in thirds: ``tr(QᵀFQ)`` on the
    range ``Q`` of ``F S`` plus Hutchinson on ``(I − QQᵀ) F (I − QQᵀ)``; ``stderr`` from the
    Hutchinson part (the ``Q`` part is exact)."""
    if matvecs < 3:
        raise ValueError(f"Hutch++ needs at least 3 products, got {matvecs}")
    gen = torch.Generator().manual_seed(seed)
    k = matvecs // 3
    S = rademacher(op.dim, k, gen, op.dtype).to(op.device)
    G = rademacher(op.dim, matvecs - 2 * k, gen, op.dtype).to(op.device)
    Q, _ = torch.linalg.qr((op @ S).double())
    Q = Q.to(op.dtype)
    head = float(torch.trace(Q.T.double() @ (op @ Q).double()))
    Gp = G - Q @ (Q.T @ G)
    tail = (Gp * (op @ Gp)).sum(0)
    m, se = _mean_stderr(tail)
    return Estimate(head + m, se, matvecs)
