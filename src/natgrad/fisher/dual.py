"""The Fisher's spectrum from the Gram matrix of its rows.

With the rows ``U = [B_n J_n]_n`` in memory (:class:`~natgrad.fisher.rows.RowFisher`, ``n = N·R``
rows and ``P`` columns), ``F = UᵀU / N`` (``P × P``) and ``K = UUᵀ / N`` (``n × n``) have the same
nonzero eigenvalues, and their eigenvectors correspond: ``K u = λ u`` with ``λ > 0`` gives
``F v = λ v`` for ``v = Uᵀu / ‖Uᵀu‖`` (``‖Uᵀu‖² = N λ``). When ``n < P`` — a wide network
analysed on a thousand samples: ``n = 10⁴`` against ``P = 10⁸`` — the whole spectrum is one
``n × n`` eigenvalue problem: exact eigenvalues (spectral density, ``log det(F + δI)``,
effective dimension with no stochastic or quadrature error), top eigenpairs from products with
``K`` (``O(n²)`` each, against ``O(N·R·P)`` for a product with ``F``), and only the ``k``
eigenvectors that are asked for ever become vectors of ``P`` (one at a time, to measure their
residuals against ``F``).

``K`` is summed block by block (:meth:`RowFisher.row_gram`): a Linear layer's rows are
``g_{n,r} ⊗ ā_n``, so its block is ``(g_{n,r}·g_{m,s}) (ā_n·ā_m)``, one ``n × d_G`` and one
``N × d_A`` Gram product; a diagonal block ``F_ℓℓ = U_ℓᵀU_ℓ / N`` has the Gram ``U_ℓU_ℓᵀ / N``
of the layer's rows, so per-layer spectra come from the same products. Cost: ``n² Σ_ℓ d_G``
flops for ``K`` plus one ``n × n`` symmetric eigenvalue problem; memory ``2 n²`` floats (the sum
and one block's, or the sum and LAPACK's copy of it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import LinearOperator
from .lanczos import lanczos_topk
from .quality import column_norms
from .results import Quadrature
from .rows import RowFisher

#: Gram matrices up to this size get a dense ``eigh`` for their top eigenpairs; larger ones
#: Lanczos on products with the matrix (float64 basis of ``n``-vectors)
DENSE_EIGH_MAX = 2048


class MatrixOperator(LinearOperator):
    """A dense symmetric ``(n, n)`` matrix as an operator on vectors of ``n``."""

    def __init__(self, M: Tensor, scale: float = 1.0) -> None:
        super().__init__(["gram"], [torch.Size([M.shape[0]])], M.dtype, M.device)
        self.M, self.scale = M, scale

    def _matmat(self, V: Tensor) -> Tensor:
        return (self.M @ V).mul_(self.scale)


@dataclass(frozen=True)
class GramEigenpairs:
    """Top eigenpairs of ``F`` through its rows' Gram matrix.

    Attributes:
        values: ``(k,)`` float64, descending: the eigenvalues of ``F`` (= those of ``K``).
        dual: ``(n, k)`` unit eigenvectors ``u`` of ``K``; ``F``'s are ``Uᵀu / ‖Uᵀu‖``
            (:func:`lifted`).
        steps: products with ``K`` (0 for a dense ``eigh``).
        method: how they were found.
    """

    values: Tensor
    dual: Tensor
    steps: int
    method: str


def gram_topk(K: Tensor, num_samples: int, k: int, tol: float = 1e-3, seed: int = 0
              ) -> GramEigenpairs:
    """The ``k`` largest eigenpairs of ``K / num_samples`` for a Gram matrix ``K = UUᵀ``
    ``(n, n)``: a dense float64 ``eigh`` for ``n ≤`` :data:`DENSE_EIGH_MAX`, else Lanczos
    (:func:`~natgrad.fisher.lanczos.lanczos_topk`, products with ``K``, residual target
    ``tol / 100``: the lifted vectors' residuals against ``F`` come on top of it)."""
    n = K.shape[0]
    k = min(k, n)
    if n <= DENSE_EIGH_MAX:
        theta, Q = torch.linalg.eigh(K.double() / num_samples)
        return GramEigenpairs(theta.flip(0)[:k], Q.flip(1)[:, :k].to(K.dtype), 0,
                              f"gram of the rows (n = {n}, dense eigh)")
    top = lanczos_topk(MatrixOperator(K, 1.0 / num_samples), k=k, tol=tol / 100, seed=seed)
    return GramEigenpairs(top.values, top.vectors, top.steps,
                          f"gram of the rows (n = {n}, Lanczos, {top.steps} products)")


def gram_eigenvalues(K: Tensor, num_samples: int) -> Tensor:
    """Every eigenvalue of ``K / num_samples`` ``(n,)``, float64, ascending, clamped at 0 (the
    Gram is positive semi-definite; rounding leaves tiny negative ones)."""
    return (torch.linalg.eigvalsh(K).double() / num_samples).clamp_min_(0.0)


def lifted(rows: RowFisher, dual: Tensor) -> Iterator[tuple[Tensor, float]]:
    """``(v, ‖Uᵀu‖)`` for each column ``u`` of ``dual`` ``(n, k)``, one at a time: ``v = Uᵀu /
    ‖Uᵀu‖`` ``(P,)``, the unit eigenvector of ``F`` (one ``Uᵀ`` product per column, no
    ``(P, k)`` block)."""
    N, R = rows.num_samples, rows.rows_per_sample
    for i in range(dual.shape[1]):
        v = rows.apply_rows_t(dual[:, i].reshape(N, R, 1).to(rows.dtype))[:, 0]
        norm = float(column_norms(v[:, None])[0])
        yield v.div_(max(norm, 1e-300)), norm


def lifted_residuals(op: LinearOperator, rows: RowFisher, pairs: GramEigenpairs) -> Tensor:
    """``‖F v − λ v‖ / λ`` ``(k,)`` for the lifted eigenvectors ``v`` (products with ``op``,
    the operator whose spectrum was asked for — the rows themselves or the model's
    operator), one column at a time."""
    res = torch.zeros(pairs.dual.shape[1], dtype=torch.float64)
    for i, (v, _) in enumerate(lifted(rows, pairs.dual)):
        lam = float(pairs.values[i])
        v = v[:, None]
        Fv = op @ v
        res[i] = float(column_norms(Fv, v.mul_(lam))[0]) / max(abs(lam), 1e-300)  # ‖Fv − λv‖
        del Fv, v
    return res


def lifted_overlap(rows: RowFisher, pairs: GramEigenpairs, W: Tensor) -> float:
    """``‖VᵀW‖_F² / k`` (as :func:`natgrad.fisher.quality.subspace_overlap`) between the lifted
    eigenvectors ``V`` and orthonormal ``W (P, k_W)``, without forming ``V``: ``VᵀW = ũᵀ(UW)``
    with ``ũ_i = u_i / ‖Uᵀu_i‖`` (one ``U W`` product)."""
    N = rows.num_samples
    norms = (pairs.values.clamp_min(1e-300) * N).sqrt()
    # one column at a time: a (P, k) product would copy W into every layer's matrices
    UW = torch.cat([rows.apply_rows(W[:, j:j + 1]).reshape(-1, 1) for j in range(W.shape[1])],
                   dim=1).double()
    G = (pairs.dual.double() / norms).T @ UW
    return float(G.pow(2).sum() / min(pairs.dual.shape[1], W.shape[1]))


def exact_quadrature(eigenvalues: Tensor, dim: int) -> Quadrature:
    """The spectral measure of ``F`` from its exact nonzero-or-not eigenvalues ``(n,)``,
    ``n ≤ dim``: nodes ``λ_i`` with weight ``1/P`` each and the eigenvalue 0 with weight
    ``(P − n)/P`` (the directions ``U`` does not reach), as a one-row
    :class:`~natgrad.fisher.results.Quadrature` marked ``exact``: ``tr f(F)`` from it is
    exact (:func:`natgrad.fisher.slq.trace_function`)."""
    n = eigenvalues.numel()
    if n > dim:
        raise ValueError(f"{n} eigenvalues for an operator of dimension {dim}")
    nodes = torch.cat([eigenvalues.double(), eigenvalues.new_zeros(1, dtype=torch.float64)])
    weights = torch.full((n + 1,), 1.0 / dim, dtype=torch.float64)
    weights[-1] = (dim - n) / dim
    return Quadrature(nodes[None], weights[None], dim, exact=True)


def disjoint(groups: dict[str, Sequence[int]]) -> bool:
    """Whether no parameter index is in two groups: then the groups' Grams and the rest's add
    up to ``U Uᵀ`` (:func:`layer_grams`)."""
    claimed = [i for g in groups.values() for i in g]
    return len(claimed) == len(set(claimed))


def layer_grams(rows: RowFisher, groups: dict[str, Sequence[int]]) -> Iterator[
        tuple[str | None, Tensor]]:
    """``(name, U_ℓ U_ℓᵀ)`` for each group of parameter indices, then ``(None, rest)`` for the
    parameters in no group (when there are any); the groups must be :func:`disjoint`, so that
    the sum of everything yielded is ``U Uᵀ``. One Gram is made at a time (the caller adds it
    up)."""
    if not disjoint(groups):
        raise ValueError("layer_grams needs disjoint groups of parameters")
    for name, idx in groups.items():
        yield name, rows.restrict([rows.names[i] for i in idx]).row_gram()
    claimed = {i for g in groups.values() for i in g}
    rest = [n for i, n in enumerate(rows.names) if i not in claimed]
    if rest:
        yield None, rows.restrict(rest).row_gram()
