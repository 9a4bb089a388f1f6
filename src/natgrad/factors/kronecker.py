"""Damped inverses of a Kronecker pair ``A ⊗ G`` applied to a layer's gradient matrix.

For a gradient matrix ``V`` of shape ``(d_G, d_A)`` (``vec`` column-stacking, so
``(A ⊗ G) vec(V) = vec(G V A)``):

* :func:`precondition` with two spectral factors applies exact Tikhonov damping,
  ``(A ⊗ G + λ I)⁻¹ vec(V)``, using ``F ≈ U diag(μ) Uᵀ + σ (I − U Uᵀ)`` for each factor. With
  full-rank eigenbases this is ``Q_G [(Q_Gᵀ V Q_A) / (μ_G μ_Aᵀ + λ)] Q_Aᵀ``; with rank-``r`` bases
  the three extra blocks (one or both directions in the orthogonal complement) divide
  ``μ_G σ_A + λ``, ``σ_G μ_Aᵀ + λ`` and ``σ_G σ_A + λ``. Cost ``O(d_G d_A r)``;
  :func:`solve` returns the result factored (:class:`Direction`) so that the optimizer adds it to
  the weights without a dense temporary.
* otherwise it applies the π-split ``(G + δ_G I)⁻¹ V (A + δ_A I)⁻¹`` with the per-factor dampings of
  :func:`split_damping`, set on the factors by :func:`refresh_pair`.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from ..norms import dot
from .base import KroneckerFactor


def split_damping(A: KroneckerFactor, G: KroneckerFactor, damping: float) -> tuple[float, float]:
    """``(π √λ, √λ / π)``, ``π² = (tr A / d_A) / (tr G / d_G)`` (Martens & Grosse 2015, §6.3)."""
    ta, tg = A.trace() / A.dim, G.trace() / G.dim
    pi = math.sqrt(ta / tg) if ta > 0 and tg > 0 and math.isfinite(ta / tg) else 1.0
    root = math.sqrt(damping)
    return pi * root, root / pi


def refresh_pair(A: KroneckerFactor, G: KroneckerFactor, damping: float) -> None:
    """Refresh both factors' inverse representations for the layer damping ``λ``."""
    da, dg = split_damping(A, G, damping)
    A.refresh(da)
    G.refresh(dg)


@dataclass
class Direction:
    """A layer's preconditioned gradient ``D = c · B + L R``, kept factored.

    ``B`` is given by its column blocks (those of ``[∇W | ∇b]``, see
    :meth:`natgrad.layers.LayerHelper.matrix_blocks`); ``L`` is ``(d_G, q)`` and ``R`` is
    ``(q, d_A)`` (both ``None`` for a plain dense direction). :meth:`add_to_` applies ``D`` to the
    parameters without forming it, and :attr:`inner` is ``⟨V, D⟩`` for the gradient ``V`` that was
    solved (the KL-clip needs it), a 0-dim tensor so that no device sync happens here.
    """

    blocks: list[Tensor]
    c: float
    L: Tensor | None
    R: Tensor | None
    inner: Tensor

    @classmethod
    def from_dense(cls, V_blocks: list[Tensor], D: Tensor) -> Direction:
        """Wrap a dense ``(d_G, d_A)`` direction solved for the gradient blocks ``V_blocks``."""
        D_blocks = list(D.split([b.shape[1] for b in V_blocks], dim=1))
        inner = sum(dot(v, d) for v, d in zip(V_blocks, D_blocks))
        return cls(D_blocks, 1.0, None, None, inner)

    def _R_blocks(self) -> list[Tensor | None]:
        if self.R is None:
            return [None] * len(self.blocks)
        return list(self.R.split([b.shape[1] for b in self.blocks], dim=1))

    def column_blocks(self) -> list[Tensor]:
        """``D`` as dense column blocks, shaped like :attr:`blocks`."""
        if self.L is None:
            return [b if self.c == 1.0 else self.c * b for b in self.blocks]
        return [
            torch.addmm(b, self.L, R, beta=self.c) for b, R in zip(self.blocks, self._R_blocks())
        ]

    def dense(self) -> Tensor:
        """``D`` as one ``(d_G, d_A)`` matrix."""
        cols = self.column_blocks()
        return torch.cat(cols, dim=1) if len(cols) > 1 else cols[0]

    def add_to_(self, targets: list[Tensor], alpha: float) -> None:
        """``targets += alpha · D`` in place, block by block (``O(d_G d_A q)``, no ``D`` formed).

        Args:
            targets: tensors shaped like :attr:`blocks` (e.g. views of the layer's parameters).
        """
        for t, b, R in zip(targets, self.blocks, self._R_blocks()):
            if self.c != 0.0:
                t.add_(b, alpha=alpha * self.c)
            if R is not None:
                t.addmm_(self.L, R, alpha=alpha)


def _spectral_solve(
    blocks: list[Tensor],
    A: KroneckerFactor,
    G: KroneckerFactor,
    damping: float,
    norm2: Tensor | None = None,
) -> Direction:
    """Exact ``(A ⊗ G + λ I)⁻¹`` on ``V = [blocks]`` for ``F = U diag(μ) Uᵀ + σ (I − U Uᵀ)``,
    returned factored.

    With ``X = U_Gᵀ V``, ``Y = V U_A``, ``Z = U_Gᵀ V U_A``, ``C = 1/(μ_G μ_Aᵀ + λ)``,
    ``D₂ = 1/(μ_G σ_A + λ)``, ``D₃ = 1/(σ_G μ_Aᵀ + λ)`` and ``c = 1/(σ_G σ_A + λ)``:

    * both low rank: the four blocks collapse to ``c V + U_G M₁ + M₂ U_Aᵀ + U_G M₃ U_Aᵀ =
      c V + [U_G, M₂] [R₁; U_Aᵀ]`` with ``M₁ = (D₂ − c) X``, ``M₂ = Y (D₃ − c)``,
      ``M₃ = Z ∘ (C − D₂ − D₃ + c)`` and ``R₁ = M₁ + M₃ U_Aᵀ``; ``⟨V, D⟩ = c ‖V‖² + ⟨X, R₁⟩ +
      ⟨Y, M₂⟩``. Two ``O(d_G d_A r)`` projections here, one rank-``(r_G + r_A)`` product when
      the direction is applied;
    * ``G`` full (``U_G`` square): ``U_G [D₂ X + (Z ∘ (C − D₂)) U_Aᵀ]``, ``⟨V, D⟩ = ⟨X, ·⟩``;
    * ``A`` full: ``[Y D₃ + U_G (Z ∘ (C − D₃))] U_Aᵀ`` (``U_G Z ∘ C`` when both are full),
      ``⟨V, D⟩ = ⟨Y, ·⟩``.
    """
    Ua, _, _ = A.eigen()
    Ug, _, _ = G.eigen()
    full_a, full_g = Ua.shape[1] == A.dim, Ug.shape[1] == G.dim
    k = _pair_constants(A, G, damping)
    if full_g and not full_a:
        X = torch.cat([Ug.T @ b for b in blocks], dim=1)  # (d_G, d_A)
        R = torch.addmm(k.d2 * X, (X @ Ua) * (k.C - k.d2), Ua.T)
        return Direction(blocks, 0.0, Ug, R, dot(X, R))
    Ua_blocks = Ua.split([b.shape[1] for b in blocks], dim=0)
    Y = blocks[0] @ Ua_blocks[0]  # (d_G, r_A)
    for b, u in zip(blocks[1:], Ua_blocks[1:]):
        Y = torch.addmm(Y, b, u)
    if full_a:
        Z = Ug.T @ Y
        L = Ug @ (Z * k.C) if full_g else torch.addmm(Y * k.d3, Ug, Z * (k.C - k.d3))
        return Direction(blocks, 0.0, L, Ua.T, dot(Y, L))
    X = torch.cat([Ug.T @ b for b in blocks], dim=1)  # (r_G, d_A)
    c = k.c
    M2 = Y * k.e3  # (d_G, r_A)
    R1 = torch.addmm(k.e2 * X, (X @ Ua) * k.K, Ua.T)  # M₁ + M₃ U_Aᵀ, (r_G, d_A)
    if norm2 is None:
        norm2 = sum(dot(b, b) for b in blocks)
    inner = c * norm2 + dot(X, R1) + dot(Y, M2)
    return Direction(blocks, c, torch.cat([Ug, M2], dim=1), torch.cat([R1, Ua.T], dim=0), inner)


@dataclass
class _PairConstants:
    """What the spectral solve needs besides ``V``; it changes only when a factor or λ does.

    All are read off ``T = 1 / ([μ_G; σ_G] [μ_A; σ_A]ᵀ + λ)`` (``(r_G + 1, r_A + 1)``, one
    outer product): ``C = T[:r_G, :r_A]``, ``D₂ = T[:r_G, r_A]`` (a column), ``D₃ = T[r_G, :r_A]``
    (a row), ``c = T[r_G, r_A]``, and the combinations ``e₂ = D₂ − c``, ``e₃ = D₃ − c``,
    ``K = C − D₂ − D₃ + c``."""

    key: tuple
    c: float
    T: Tensor
    K: Tensor
    e2: Tensor
    e3: Tensor

    @property
    def C(self) -> Tensor:
        return self.T[:-1, :-1]

    @property
    def d2(self) -> Tensor:
        return self.T[:-1, -1:]

    @property
    def d3(self) -> Tensor:
        return self.T[-1:, :-1]


#: the last constants per ``A`` factor (weakly keyed: dropped with the factor)
_CONSTANTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _pair_constants(A: KroneckerFactor, G: KroneckerFactor, damping: float) -> _PairConstants:
    Ua, mu_a, sig_a = A.eigen()
    Ug, mu_g, sig_g = G.eigen()
    # the cached entry holds these tensors, so identity checks cannot be fooled by reused ids
    key = (G, Ua, mu_a, Ug, mu_g, float(sig_a), float(sig_g), float(damping))
    hit = _CONSTANTS.get(A)
    if hit is not None and len(hit.key) == len(key) and all(
        x is y or (isinstance(x, float) and x == y) for x, y in zip(hit.key, key)
    ):
        return hit
    ext_g = torch.cat([mu_g, mu_g.new_full((1,), float(sig_g))])
    ext_a = torch.cat([mu_a, mu_a.new_full((1,), float(sig_a))])
    T = torch.outer(ext_g, ext_a).add_(damping).reciprocal_()  # (r_G + 1, r_A + 1)
    c = 1.0 / (float(sig_g) * float(sig_a) + damping)
    e2, e3 = T[:-1, -1:] - c, T[-1:, :-1] - c
    const = _PairConstants(key, c, T, T[:-1, :-1] - T[:-1, -1:] - e3, e2, e3)
    _CONSTANTS[A] = const
    return const


def solve(
    blocks: list[Tensor],
    A: KroneckerFactor,
    G: KroneckerFactor,
    damping: float,
    norm2: Tensor | None = None,
) -> Direction:
    """The natural-gradient direction ``(A ⊗ G + λ I)⁻¹ vec(V)`` for ``V = [blocks]``.

    Exact damping for spectral pairs (factored when both are low rank) and for a diagonal ``A``
    with a spectral ``G``, π-split damping otherwise (see the module docstring).

    Args:
        blocks: column blocks of the ``(d_G, d_A)`` gradient matrix (e.g. ``[∇W, ∇b]``).
        norm2: ``‖V‖²`` if already known (saves one pass over ``V``).
    """
    if A.spectral and G.spectral:
        return _spectral_solve(blocks, A, G, damping, norm2)
    V = torch.cat(blocks, dim=1) if len(blocks) > 1 else blocks[0]
    if getattr(A, "diagonal", False) and G.spectral:
        return Direction.from_dense(blocks, _diagonal_solve(V, A, G, damping))
    return Direction.from_dense(blocks, A.inv_matmul(G.inv_matmul(V).T).T)


def _diagonal_solve(V: Tensor, A: KroneckerFactor, G: KroneckerFactor, damping: float
                    ) -> Tensor:
    """Exact ``(diag(a) ⊗ G + λ I)⁻¹ vec(V)`` for a diagonal ``A`` and a spectral
    ``G = U diag(μ) Uᵀ + σ (I − U Uᵀ)``: column ``j`` is ``(a_j G + λ I)⁻¹ V_j``, i.e.
    ``U (X_j / (a_j μ + λ)) + (V_j − U X_j) / (a_j σ + λ)`` with ``X = Uᵀ V``; ``O(d_G d_A r)``
    (``d_A`` may be a vocabulary: nothing of size ``d_A²`` is formed)."""
    U, mu, sig = G.eigen()
    a = A.diag()
    X = U.T @ V  # (r, d_A)
    D = U @ (X / (torch.outer(mu, a) + damping))
    if U.shape[1] < G.dim:
        D = D + (V - U @ X) / (float(sig) * a + damping)
    return D


def precondition(V: Tensor, A: KroneckerFactor, G: KroneckerFactor, damping: float) -> Tensor:
    """:func:`solve` for a ``(d_G, d_A)`` matrix ``V``, returned as a dense matrix."""
    return solve([V], A, G, damping).dense()


def kronecker_matvec(V: Tensor, A: KroneckerFactor, G: KroneckerFactor) -> Tensor:
    """``(A ⊗ G) vec(V) = vec(G V A)`` with the factors as represented (dense or low-rank)."""
    return _apply(G, _apply(A, V.T).T)


def _apply(F: KroneckerFactor, v: Tensor) -> Tensor:
    """``F v`` for ``v`` of shape ``(d, k)`` without forming ``F`` when it is low rank."""
    if getattr(F, "diagonal", False):
        return F.diag().unsqueeze(-1) * v
    if F.spectral:
        U, mu, sig = F.eigen()
        Utv = U.T @ v
        out = U @ (mu[:, None] * Utv)
        if U.shape[1] < F.dim:
            out = out + sig * (v - U @ Utv)
        return out
    return F.to_dense() @ v
