"""Closed forms of the block-diagonal K-FAC operator, from each block's own closed forms
(:meth:`natgrad.blocks.CurvatureBlock.top_eigenvalues`, ``trace``, ``logdet``); for a Kronecker
block those come from the factors' eigenvalues alone (:mod:`natgrad.blocks.closed_forms`, whose
``kron_*`` functions are re-exported here).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..blocks.closed_forms import kron_logdet, kron_top_eigenvalues, kron_trace
from .kfac import KFACOperator

__all__ = ["kfac_logdet", "kfac_top_eigenvalues", "kfac_trace", "kron_logdet",
           "kron_top_eigenvalues", "kron_trace"]


def kfac_top_eigenvalues(op: KFACOperator, k: int) -> Tensor:
    """The ``k`` largest eigenvalues of the block-diagonal operator (zeros for uncovered
    parameters)."""
    tops = [b.top_eigenvalues(k) for b in op.blocks.values()]
    covered = sum(b.size for b in op.blocks.values())
    allv = torch.cat(tops + [torch.zeros(min(k, op.dim - covered), dtype=torch.float64)])
    return torch.sort(allv, descending=True).values[:k]


def kfac_trace(op: KFACOperator) -> float:
    """``Σ_ℓ tr B_ℓ`` (``tr A_ℓ · tr G_ℓ`` for Kronecker blocks)."""
    return sum(b.trace() for b in op.blocks.values())


def kfac_logdet(op: KFACOperator, damping: float) -> float:
    """``log det(K + λ I)``; uncovered parameters contribute ``log λ`` each."""
    covered = sum(b.size for b in op.blocks.values())
    rest = (op.dim - covered) * (math.log(damping) if damping > 0 else -math.inf)
    return sum(b.logdet(damping) for b in op.blocks.values()) + rest
