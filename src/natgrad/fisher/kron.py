"""Closed forms for Kronecker blocks ``A ⊗ G`` and the block-diagonal K-FAC operator, from the
factors' eigenvalues alone (no Kronecker product is formed).

* eigenvalues of ``A ⊗ G``: all products ``α_i γ_j``;
* ``tr(A ⊗ G) = tr A · tr G``;
* ``log det(A ⊗ G) = d_G log det A + d_A log det G``;
* ``log det(A ⊗ G + λ I) = Σ_ij log(α_i γ_j + λ)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..factors import KroneckerFactor
from .kfac import KFACOperator


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


def kfac_top_eigenvalues(op: KFACOperator, k: int) -> Tensor:
    """The ``k`` largest eigenvalues of the block-diagonal operator (zeros for uncovered
    parameters)."""
    tops = [kron_top_eigenvalues(A, G, k) for A, G in op.factors.values()]
    allv = torch.cat(tops + [torch.zeros(min(k, op.dim - sum(
        A.dim * G.dim for A, G in op.factors.values())), dtype=torch.float64)])
    return torch.sort(allv, descending=True).values[:k]


def kfac_trace(op: KFACOperator) -> float:
    """``Σ_ℓ tr A_ℓ · tr G_ℓ``."""
    return sum(kron_trace(A, G) for A, G in op.factors.values())


def kfac_logdet(op: KFACOperator, damping: float) -> float:
    """``log det(K + λ I)``; uncovered parameters contribute ``log λ`` each."""
    covered = sum(A.dim * G.dim for A, G in op.factors.values())
    rest = (op.dim - covered) * (math.log(damping) if damping > 0 else -math.inf)
    return sum(kron_logdet(A, G, damping) for A, G in op.factors.values()) + rest


def kfac_top_eigenpairs(op: KFACOperator, k: int) -> tuple[Tensor, Tensor] | None:
    """The ``k`` largest eigenpairs of the block-diagonal operator in closed form, or ``None``.

    The eigenvectors of ``A ⊗ G`` are ``vec(q_G q_Aᵀ)`` for eigenvectors ``q_A``, ``q_G`` of the
    factors, with eigenvalue ``α γ``; placed in the layer's parameters, zero elsewhere. Needs
    spectral factors (:meth:`KroneckerFactor.eigen`); ``None`` (use Lanczos) when a factor is not
    spectral, or when the ``k``-th value does not exceed every value whose eigenspace is not
    given explicitly (a low-rank factor's remainder ``σ (I − UUᵀ)``, the zero blocks).

    Returns:
        ``values (k,)`` (float64, descending) and orthonormal ``vectors (P, k)``.
    """
    cands: list[tuple[float, str, int, int]] = []
    bound = 0.0  # largest eigenvalue without an explicit eigenvector
    for name, (A, G) in op.factors.items():
        if not (A.spectral and G.spectral):
            return None
        (UA, la, sa), (UG, lg, sg) = A.eigen(), G.eigen()
        la, lg = la.double().clamp_min(0), lg.double().clamp_min(0)
        ia = torch.argsort(la, descending=True)[:k]
        ig = torch.argsort(lg, descending=True)[:k]
        prods = torch.outer(la[ia], lg[ig])
        top = torch.topk(prods.flatten(), min(k, prods.numel()))
        for v, f in zip(top.values.tolist(), top.indices.tolist()):
            cands.append((v, name, int(ia[f // len(ig)]), int(ig[f % len(ig)])))
        ma, mg = float(la.max()), float(lg.max())
        if UA.shape[1] < A.dim:
            bound = max(bound, max(sa, 0.0) * max(mg, max(sg, 0.0)))
        if UG.shape[1] < G.dim:
            bound = max(bound, max(sg, 0.0) * max(ma, max(sa, 0.0)))
    cands.sort(key=lambda c: -c[0])
    if len(cands) < k or not cands[k - 1][0] > bound:
        return None
    vectors = torch.zeros(op.dim, k, dtype=op.dtype, device=op.device)
    for col, (_, name, i, j) in enumerate(cands[:k]):
        A, G = op.factors[name]
        M = torch.outer(G.eigen()[0][:, j], A.eigen()[0][:, i])
        helper = op.layers[name]
        for p, t in zip(op._index[name], helper.split_matrix(M)):
            vectors[op.offsets[p]:op.offsets[p + 1], col] = t.reshape(-1).to(op.dtype)
    values = torch.tensor([c[0] for c in cands[:k]], dtype=torch.float64)
    return values, vectors
