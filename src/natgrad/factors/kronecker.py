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

import torch
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
    """Exact ``(A ⊗ G + λ I)⁻¹`` on ``V`` for ``F = U diag(μ) Uᵀ + σ (I − U Uᵀ)`` factors.

    With ``X = U_Gᵀ V``, ``Y = V U_A``, ``Z = U_Gᵀ V U_A`` and ``c = 1/(σ_G σ_A + λ)`` the four
    blocks collapse to ``c V + U_G M₁ + M₂ U_Aᵀ + U_G M₃ U_Aᵀ``: four ``O(d_G d_A r)`` products.
    """
    Ua, mu_a, sig_a = A.eigen()
    Ug, mu_g, sig_g = G.eigen()
    full_a, full_g = Ua.shape[1] == A.dim, Ug.shape[1] == G.dim
    inv_core = 1.0 / (mu_g[:, None] * mu_a[None, :] + damping)  # (r_G, r_A)
    if full_a and full_g:
        return Ug @ (((Ug.T @ V) @ Ua) * inv_core) @ Ua.T
    if full_g:  # A low rank: U_G [D₂ X + (C∘Z − D₂ Z) U_Aᵀ], D₂ = 1/(μ_G σ_A + λ)
        X = Ug.T @ V
        Z = X @ Ua
        d2 = 1.0 / (mu_g[:, None] * sig_a + damping)
        return Ug @ (d2 * X + (Z * inv_core - d2 * Z) @ Ua.T)
    if full_a:  # G low rank: [Y D₃ + U_G (C∘Z − Z D₃)] U_Aᵀ, D₃ = 1/(σ_G μ_A + λ)
        Y = V @ Ua
        Z = Ug.T @ Y
        d3 = 1.0 / (sig_g * mu_a[None, :] + damping)
        return (Y * d3 + Ug @ (Z * inv_core - Z * d3)) @ Ua.T
    c = 1.0 / (sig_g * sig_a + damping)
    X = Ug.T @ V  # (r_G, d_A)
    Y = V @ Ua  # (d_G, r_A)
    Z = X @ Ua  # (r_G, r_A)
    d2 = 1.0 / (mu_g[:, None] * sig_a + damping)  # (r_G, 1)
    d3 = 1.0 / (sig_g * mu_a[None, :] + damping)  # (1, r_A)
    M1 = (d2 - c) * X
    M2 = Y * (d3 - c)
    M3 = Z * inv_core - d2 * Z - Z * d3 + c * Z
    # c V + U_G (M₁ + M₃ U_Aᵀ) + M₂ U_Aᵀ as one (d_G × (r_G + r_A)) @ ((r_G + r_A) × d_A) product
    left = torch.cat([Ug, M2], dim=1)
    right = torch.cat([torch.addmm(M1, M3, Ua.T), Ua.T], dim=0)
    return torch.addmm(V, left, right, beta=c)


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
