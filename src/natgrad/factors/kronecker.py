"""Damped inverses of a Kronecker pair ``A ⊗ G`` applied to a layer's gradient matrix.

For a gradient matrix ``V`` of shape ``(d_G, d_A)`` (``vec`` column-stacking, so
``(A ⊗ G) vec(V) = vec(G V A)``):

* :func:`precondition` with two spectral factors applies exact Tikhonov damping,
  ``(A ⊗ G + λ I)⁻¹ vec(V)``, using ``F ≈ U diag(μ) Uᵀ + σ (I − U Uᵀ)`` for each factor. With
  full-rank eigenbases this is ``Q_G [(Q_Gᵀ V Q_A) / (μ_G μ_Aᵀ + λ)] Q_Aᵀ``; with rank-``r`` bases
  the three extra blocks (one or both directions in the orthogonal complement) divide
  ``μ_G σ_A + λ``, ``σ_G μ_Aᵀ + λ`` and ``σ_G σ_A + λ``. Cost ``O(d_G d_A r)``.
* otherwise it applies the π-split ``(G + δ_G I)⁻¹ V (A + δ_A I)⁻¹`` with the per-factor dampings of
  :func:`split_damping`, set on the factors by :func:`refresh_pair`.
"""

from __future__ import annotations

import math

from torch import Tensor

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


def _spectral_solve(V: Tensor, A: KroneckerFactor, G: KroneckerFactor, damping: float) -> Tensor:
    Ua, mu_a, sig_a = A.eigen()
    Ug, mu_g, sig_g = G.eigen()
    full_a, full_g = Ua.shape[1] == A.dim, Ug.shape[1] == G.dim
    Ug_V = Ug.T @ V  # (r_G, d_A)
    core = Ug_V @ Ua  # (r_G, r_A)
    out = Ug @ ((core / (mu_g[:, None] * mu_a[None, :] + damping)) @ Ua.T)
    if not full_a:  # G-subspace × A-complement
        rest = Ug_V - core @ Ua.T
        out = out + Ug @ (rest / (mu_g[:, None] * sig_a + damping))
    if not full_g:  # G-complement
        R = V - Ug @ Ug_V  # (d_G, d_A)
        R_Ua = R @ Ua
        out = out + (R_Ua / (sig_g * mu_a[None, :] + damping)) @ Ua.T
        if not full_a:
            out = out + (R - R_Ua @ Ua.T) / (sig_g * sig_a + damping)
    return out


def precondition(V: Tensor, A: KroneckerFactor, G: KroneckerFactor, damping: float) -> Tensor:
    """The natural-gradient direction ``(A ⊗ G + λ I)⁻¹ vec(V)`` as a ``(d_G, d_A)`` matrix.

    Exact damping for spectral pairs, π-split damping otherwise (see the module docstring).
    """
    if A.spectral and G.spectral:
        return _spectral_solve(V, A, G, damping)
    return A.inv_matmul(G.inv_matmul(V).T).T


def kronecker_matvec(V: Tensor, A: KroneckerFactor, G: KroneckerFactor) -> Tensor:
    """``(A ⊗ G) vec(V) = vec(G V A)`` with the factors as represented (dense or low-rank)."""
    return _apply(G, _apply(A, V.T).T)


def _apply(F: KroneckerFactor, v: Tensor) -> Tensor:
    """``F v`` for ``v`` of shape ``(d, k)`` without forming ``F`` when it is low rank."""
    if F.spectral:
        U, mu, sig = F.eigen()
        Utv = U.T @ v
        out = U @ (mu[:, None] * Utv)
        if U.shape[1] < F.dim:
            out = out + sig * (v - U @ Utv)
        return out
    return F.to_dense() @ v
