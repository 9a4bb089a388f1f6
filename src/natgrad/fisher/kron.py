"""Closed forms of the block-diagonal K-FAC operator, from each block's own closed forms
(:meth:`natgrad.blocks.CurvatureBlock.top_eigenvalues`, ``trace``, ``logdet``); for a Kronecker
block those come from the factors' eigenvalues alone (:mod:`natgrad.blocks.closed_forms`, whose
``kron_*`` functions are re-exported here).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..blocks import KroneckerBlock
from ..blocks.closed_forms import kron_logdet, kron_top_eigenvalues, kron_trace
from .kfac import KFACOperator

__all__ = ["kfac_logdet", "kfac_top_eigenpairs", "kfac_top_eigenvalues", "kfac_trace",
           "kron_logdet",
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


def kfac_top_eigenpairs(op: KFACOperator, k: int) -> tuple[Tensor, Tensor] | None:
    """The ``k`` largest eigenpairs of the block-diagonal operator in closed form, or ``None``.

    The eigenvectors of ``A ⊗ G`` are ``vec(q_G q_Aᵀ)`` for eigenvectors ``q_A``, ``q_G`` of the
    factors, with eigenvalue ``α γ``; placed in the layer's parameters, zero elsewhere. Needs
    Kronecker blocks with spectral factors (:meth:`KroneckerFactor.eigen`); ``None`` (use
    Lanczos) when a block is of another kind, or when the ``k``-th value does not exceed every
    value whose eigenspace is not given explicitly (a low-rank factor's remainder
    ``σ (I − UUᵀ)``, the zero blocks).

    Returns:
        ``values (k,)`` (float64, descending) and orthonormal ``vectors (P, k)``.
    """
    cands: list[tuple[float, str, int, int]] = []
    bound = 0.0  # largest eigenvalue without an explicit eigenvector
    for name, block in op.blocks.items():
        if not isinstance(block, KroneckerBlock) or not (block.A.spectral and block.G.spectral):
            return None
        (UA, la, sa), (UG, lg, sg) = block.A.eigen(), block.G.eigen()
        la, lg = la.double().clamp_min(0), lg.double().clamp_min(0)
        ia = torch.argsort(la, descending=True)[:k]
        ig = torch.argsort(lg, descending=True)[:k]
        prods = torch.outer(la[ia], lg[ig])
        top = torch.topk(prods.flatten(), min(k, prods.numel()))
        for v, f in zip(top.values.tolist(), top.indices.tolist()):
            cands.append((v, name, int(ia[f // len(ig)]), int(ig[f % len(ig)])))
        ma, mg = float(la.max()), float(lg.max())
        if UA.shape[1] < block.A.dim:
            bound = max(bound, max(sa, 0.0) * max(mg, max(sg, 0.0)))
        if UG.shape[1] < block.G.dim:
            bound = max(bound, max(sg, 0.0) * max(ma, max(sa, 0.0)))
    cands.sort(key=lambda c: -c[0])
    if len(cands) < k or not cands[k - 1][0] > bound:
        return None
    vectors = torch.zeros(op.dim, k, dtype=op.dtype, device=op.device)
    for col, (_, name, i, j) in enumerate(cands[:k]):
        block = op.blocks[name]
        M = torch.outer(block.G.eigen()[0][:, j], block.A.eigen()[0][:, i])
        helper = op.layers[name]
        for p, t in zip(op._index[name], helper.split_matrix(M)):
            vectors[op.offsets[p]:op.offsets[p + 1], col] = t.reshape(-1).to(op.dtype)
    values = torch.tensor([c[0] for c in cands[:k]], dtype=torch.float64)
    return values, vectors
