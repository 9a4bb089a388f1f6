"""Closed forms for a Kronecker block ``A ⊗ G`` from the factors' eigenvalues alone (no
Kronecker product is formed).

* eigenvalues of ``A ⊗ G``: all products ``α_i γ_j``;
* ``tr(A ⊗ G) = tr A · tr G``;
* ``log det(A ⊗ G) = d_G log det A + d_A log det G``;
* ``log det(A ⊗ G + λ I) = Σ_ij log(α_i γ_j + λ)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..factors import KroneckerFactor


def _eigs(f: KroneckerFactor | Tensor) -> Tensor:
    """Descending, clamped at 0 (the factors are PSD)."""
    e = f if isinstance(f, Tensor) else f.eigenvalues()
    return torch.sort(e.double().clamp_min(0), descending=True).values


def kron_top_eigenvalues(a: KroneckerFactor | Tensor, g: KroneckerFactor | Tensor,
                         k: int) -> Tensor:
    """The ``k`` largest ``α_i γ_j`` (descending) from the top ``k`` of each factor only."""
    ea, eg = _eigs(a)[:k], _eigs(g)[:k]
    return torch.sort(torch.outer(ea, eg).flatten(), descending=True).values[:k]


def kron_trace(a: KroneckerFactor | Tensor, g: KroneckerFactor | Tensor) -> float:
    """``tr A · tr G``."""
    return float(_eigs(a).sum() * _eigs(g).sum())


def kron_logdet(a: KroneckerFactor | Tensor, g: KroneckerFactor | Tensor,
                damping: float = 0.0, block: int = 1 << 22) -> float:
    """``log det(A ⊗ G + λ I)``; for ``λ = 0``: ``d_G log det A + d_A log det G``."""
    ea, eg = _eigs(a), _eigs(g)
    if damping == 0.0:
        return float(eg.numel() * ea.log().sum() + ea.numel() * eg.log().sum())
    rows = max(1, block // eg.numel())
    return float(sum(torch.log(torch.outer(ea[s:s + rows], eg) + damping).sum()
                     for s in range(0, ea.numel(), rows)))
