"""Damped inverse products ``(M + λ I)⁻¹ v`` as operators.

* :class:`KFACInverse` — the closed form for a :class:`~natgrad.fisher.kfac.KFACOperator` (any
  factor strategy, the projected one included), block by block:

  - ``damping_mode="exact"``: ``(A ⊗ G + λ I)⁻¹`` from the eigendecompositions of both factors,
    ``F ≈ U diag(μ) Uᵀ + σ (I − U Uᵀ)``; with full bases ``Q_G [(Q_Gᵀ V Q_A) / (μ_G μ_Aᵀ + λ)]
    Q_Aᵀ``, with rank-``r`` bases three more blocks (one or both directions in the complement)
    divide ``μ_G σ_A + λ``, ``σ_G μ_Aᵀ + λ`` and ``σ_G σ_A + λ``
    (:func:`natgrad.factors.solve`). Factors that keep no eigendecomposition (``cholesky``,
    ``recursive``) are decomposed here from their dense matrix; a diagonal ``A`` (embeddings)
    is used as it is.
  - ``damping_mode="factored"``: ``(A + π√λ I)⁻¹ ⊗ (G + √λ/π I)⁻¹`` with the π of
    :func:`natgrad.factors.split_damping` — what K-FAC optimizers apply. It is **not**
    ``(A ⊗ G + λ I)⁻¹``: it adds the cross term ``π√λ G + (√λ/π) A`` to the matrix.

  Other blocks (the per-channel 2×2 blocks of normalization layers) use their own exact damped
  solve; parameters outside every block (a zero block) get ``v / λ``.
* :class:`CGInverse` — conjugate gradients on any operator (the exact, MC or empirical Fisher),
  column by column in one batched iteration, optionally preconditioned (e.g. by a
  :class:`KFACInverse`); convergence is recorded in :attr:`CGInverse.info` and a warning is given
  when a column does not reach the tolerance.

The EK-FAC operator and its inverse are in :mod:`natgrad.fisher.ekfac`; :func:`damped_inverse`
picks the closed form where one exists and conjugate gradients otherwise.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..blocks import KroneckerBlock
from ..factors import KroneckerFactor, solve, split_damping
from .base import LinearOperator
from .kfac import KFACOperator, layer_map

DAMPING_MODES = ("exact", "factored")

__all__ = ["DAMPING_MODES", "CGInfo", "CGInverse", "KFACInverse", "check_damping",
           "damped_inverse", "layer_map"]


def check_damping(damping: Any) -> float:
    """``λ`` as a float; ``ValueError`` unless it is a finite positive number."""
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not (
            math.isfinite(damping) and damping > 0):
        raise ValueError(f"damping must be a finite positive number, got {damping!r}")
    return float(damping)


class _Eigen:
    """A factor seen through its eigendecomposition ``F = U diag(μ) Uᵀ`` (computed in float64,
    kept in the factor's dtype), for factors that keep none themselves; duck-types the spectral
    part of :class:`KroneckerFactor`."""

    spectral = True
    diagonal = False

    def __init__(self, factor: KroneckerFactor) -> None:
        self.dim = factor.dim
        mu, U = torch.linalg.eigh(factor.to_dense().double())
        self._eigen = (U.to(factor.dtype), mu.to(factor.dtype), 0.0)

    def eigen(self) -> tuple[Tensor, Tensor, float]:
        return self._eigen


def spectral_view(factor: KroneckerFactor) -> Any:
    """The factor itself when it is spectral, else its eigendecomposition."""
    return factor if factor.spectral else _Eigen(factor)


def _factor_solve(F: Any, delta: float, X: Tensor) -> Tensor:
    """``(F + δ I)⁻¹ X`` for ``X`` ``(d, k)``: a diagonal factor or a spectral view."""
    if getattr(F, "diagonal", False):
        return X / (F.diag().to(X.dtype) + delta).unsqueeze(-1)
    U, mu, sig = F.eigen()
    U, mu = U.to(X.dtype), mu.to(X.dtype)
    UtX = U.T @ X
    out = U @ (UtX / (mu + delta).unsqueeze(-1))
    if U.shape[1] < F.dim:
        out = out + (X - U @ UtX) / (float(sig) + delta)
    return out


class KFACInverse(LinearOperator):
    """``(K + λ I)⁻¹`` for a K-FAC operator ``K`` (see the module docstring).

    Args:
        op: the K-FAC (or projected K-FAC) operator.
        damping: ``λ > 0``.
        damping_mode: ``"exact"`` (``(A ⊗ G + λ I)⁻¹``) or ``"factored"``
            (``(A + π√λ I)⁻¹ ⊗ (G + √λ/π I)⁻¹``, the optimizers' damping).
    """

    def __init__(self, op: KFACOperator, damping: float, damping_mode: str = "exact") -> None:
        if not isinstance(op, KFACOperator):
            raise TypeError(f"op must be a KFACOperator, got {type(op).__name__}")
        if damping_mode not in DAMPING_MODES:
            raise ValueError(f"damping_mode must be one of {DAMPING_MODES}, got "
                             f"{damping_mode!r}")
        self.damping = check_damping(damping)
        super().__init__(op.names, op.shapes, op.dtype, op.device)
        self.op, self.damping_mode = op, damping_mode
        self._views: dict[str, tuple[Any, Any]] = {}
        for name, block in op.blocks.items():
            if isinstance(block, KroneckerBlock):
                G = spectral_view(block.G)
                A = block.A if (block.A.spectral or block.A.diagonal) else _Eigen(block.A)
                self._views[name] = (A, G)

    def solve_layer(self, name: str, M: Tensor) -> Tensor:
        """The damped inverse of layer ``name``'s block on its ``(d_G, d_A)`` matrix ``M``."""
        helper, block = self.op.layers[name], self.op.blocks[name]
        if name not in self._views:  # a block with its own exact damped solve
            dtype = block.factors[0].dtype
            return block.solve(helper.matrix_blocks(helper.split_matrix(M.to(dtype))),
                               self.damping).dense()
        A, G = self._views[name]
        if self.damping_mode == "factored":
            da, dg = split_damping(block.A, block.G, self.damping)
            return _factor_solve(A, da, _factor_solve(G, dg, M).T).T
        M = M.to(block.A.dtype)
        return solve(helper.matrix_blocks(helper.split_matrix(M)), A, G, self.damping).dense()

    def _matmat(self, V: Tensor) -> Tensor:
        return layer_map(self.op, V, self.solve_layer, 1.0 / self.damping)


@dataclass(frozen=True)
class CGInfo:
    """How a :class:`CGInverse` product ended.

    Attributes:
        iterations: iterations run (the slowest column's).
        residuals: per column ``‖b − (M + λI) x‖ / ‖b‖`` at the end (from the recurrence).
        converged: every column reached the tolerance.
    """

    iterations: int
    residuals: tuple[float, ...]
    converged: bool


class CGInverse(LinearOperator):
    """``(M + λ I)⁻¹`` by (preconditioned) conjugate gradients, every column of a ``(P, k)``
    product iterated together (one ``(P, k)`` product with ``M`` per iteration).

    Args:
        op: a symmetric positive semi-definite operator (e.g. an
            :class:`~natgrad.fisher.ExactFisher`).
        damping: ``λ > 0``.
        tol: stop a column once ``‖r‖ ≤ tol · ‖b‖``.
        max_iter: at most this many iterations (default ``P``, where exact arithmetic
            converges).
        preconditioner: an operator approximating ``(M + λ I)⁻¹`` (e.g. :class:`KFACInverse`),
            symmetric positive definite.
        warn: warn when a product ends before every column reached ``tol``.

    Attributes:
        info: :class:`CGInfo` of the last product (``None`` before the first).
    """

    def __init__(self, op: LinearOperator, damping: float, tol: float = 1e-10,
                 max_iter: int | None = None, preconditioner: LinearOperator | None = None,
                 warn: bool = True) -> None:
        if not isinstance(op, LinearOperator):
            raise TypeError(f"op must be a LinearOperator, got {type(op).__name__}")
        self.damping = check_damping(damping)
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1:
            raise ValueError(f"tol must be a number in (0, 1), got {tol!r}")
        if max_iter is not None and (isinstance(max_iter, bool) or not isinstance(max_iter, int)
                                     or max_iter < 1):
            raise ValueError(f"max_iter must be None or a positive integer, got {max_iter!r}")
        if preconditioner is not None and preconditioner.shape != op.shape:
            raise ValueError(f"preconditioner has shape {preconditioner.shape}, the operator "
                             f"{op.shape}")
        super().__init__(op.names, op.shapes, op.dtype, op.device)
        self.op, self.tol, self.preconditioner, self.warn = op, float(tol), preconditioner, warn
        self.max_iter = max_iter if max_iter is not None else op.dim
        self.info: CGInfo | None = None

    def _system(self, V: Tensor) -> Tensor:
        return self.op._matmat(V) + self.damping * V

    def _precondition(self, R: Tensor) -> Tensor:
        if self.preconditioner is None:
            return R
        return self.preconditioner._matmat(R.to(self.preconditioner.dtype)).to(R.dtype)

    def _matmat(self, B: Tensor) -> Tensor:
        X = torch.zeros_like(B)
        R = B.clone()
        bnorm = B.norm(dim=0)
        target = self.tol * bnorm
        Z = self._precondition(R)
        Pdir = Z.clone()
        rz = (R * Z).sum(0)
        active = bnorm > target
        it = 0
        while bool(active.any()) and it < self.max_iter:
            it += 1
            AP = self._system(Pdir)
            curv = (Pdir * AP).sum(0)
            alpha = torch.where(active, rz / torch.where(active, curv, 1.0), 0.0)
            X += alpha * Pdir
            R -= alpha * AP
            active = active & (R.norm(dim=0) > target)
            Z = self._precondition(R)
            rz_new = (R * Z).sum(0)
            beta = torch.where(active, rz_new / torch.where(active, rz, 1.0), 0.0)
            Pdir = Z + beta * Pdir
            rz = rz_new
        rel = (R.norm(dim=0) / bnorm.clamp_min(torch.finfo(B.dtype).tiny)).tolist()
        self.info = CGInfo(it, tuple(rel), not bool(active.any()))
        if self.warn and not self.info.converged:
            warnings.warn(f"CGInverse: {int(active.sum())} of {B.shape[1]} columns did not reach "
                          f"tol={self.tol:g} in max_iter={self.max_iter} iterations (largest "
                          f"relative residual {max(rel):.3g}); raise max_iter or the damping, "
                          "or pass a preconditioner", RuntimeWarning, stacklevel=3)
        return X


def damped_inverse(op: LinearOperator, damping: float, **options: Any) -> LinearOperator:
    """``(op + λ I)⁻¹`` as an operator: the closed form for K-FAC (:class:`KFACInverse`) and
    EK-FAC (:class:`~natgrad.fisher.ekfac.EKFACInverse`) operators, conjugate gradients
    (:class:`CGInverse`) for any other; ``options`` go to that class."""
    from .ekfac import EKFACOperator

    if isinstance(op, KFACOperator):
        return KFACInverse(op, damping, **options)
    if isinstance(op, EKFACOperator):
        return op.inverse(damping, **options)
    return CGInverse(op, damping, **options)
