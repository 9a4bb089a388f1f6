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


#: pairs whose layer matrix has at most this many entries are solved together with their
#: equal-shaped peers by :func:`solve_many` (above it one layer's products outweigh the per-call
#: overhead that batching saves, and the stacked gradients would be a large temporary)
BATCH_MAX_ENTRIES = 1 << 17

#: a request of :func:`solve_many`: ``(blocks, A, G, λ, ‖V‖² or None)``
SolveRequest = tuple[list[Tensor], KroneckerFactor, KroneckerFactor, float, "Tensor | None"]


def solve_many(requests: list[SolveRequest]) -> list[Direction]:
    """:func:`solve` for several layers, in order; equal-shaped spectral pairs in one batch.

    Pairs of spectral factors whose layer matrices have the same shape and column blocks and
    whose bases have the same ranks (both factors low rank, or both full rank) and at most
    :data:`BATCH_MAX_ENTRIES` entries are solved together by :func:`_batched_solve` (the
    formulas of :func:`_spectral_solve` as ``(k, ·, ·)`` products, the direction returned dense);
    every other request by :func:`solve`. The two agree to rounding.
    """
    out: list[Direction | None] = [None] * len(requests)
    groups: dict[tuple, list[int]] = {}
    for i, (blocks, A, G, _, _) in enumerate(requests):
        key = _batch_key(blocks, A, G)
        if key is None:
            out[i] = solve(*requests[i])
        else:
            groups.setdefault(key, []).append(i)
    for key, idx in groups.items():
        if len(idx) == 1:
            out[idx[0]] = solve(*requests[idx[0]])
            continue
        for i, D in zip(idx, _batched_solve([requests[i] for i in idx], full=key[-1])):
            out[i] = D
    return out  # type: ignore[return-value]


def _batch_key(blocks: list[Tensor], A: KroneckerFactor, G: KroneckerFactor) -> tuple | None:
    """What equal-shaped pairs share, or ``None`` when the pair is solved on its own."""
    if not (A.spectral and G.spectral) or A.dim * G.dim > BATCH_MAX_ENTRIES:
        return None
    ra, rg = A.eigen()[0].shape[1], G.eigen()[0].shape[1]
    full_a, full_g = ra == A.dim, rg == G.dim
    if full_a != full_g:
        return None
    v = blocks[0]
    return (A.dim, G.dim, ra, rg, tuple(b.shape[1] for b in blocks), v.dtype, v.device,
            full_a)


@dataclass
class _PairStack:
    """The bases and constants of ``k`` pairs stacked for :func:`_batched_solve` (``key``: the
    pairs' :class:`_PairConstants`, whose identity says whether the stack is current)."""

    key: list
    Ua: Tensor  # (k, d_A, r_A)
    Ug: Tensor  # (k, d_G, r_G)
    C: Tensor  # (k, r_G, r_A); K when both are low rank
    e2: Tensor  # (k, r_G, 1)
    e3: Tensor  # (k, 1, r_A)
    c: Tensor  # (k, 1, 1)


#: the last stack per first ``A`` factor of a group (weakly keyed, like :data:`_CONSTANTS`)
_STACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _pair_stack(requests: list[SolveRequest], full: bool) -> _PairStack:
    consts = [_pair_constants(A, G, lam) for _, A, G, lam, _ in requests]
    first = requests[0][1]
    hit = _STACKS.get(first)
    if hit is not None and len(hit.key) == len(consts) and all(
        x is y for x, y in zip(hit.key, consts)
    ):
        return hit
    Ua = torch.stack([A.eigen()[0] for _, A, _, _, _ in requests])
    Ug = torch.stack([G.eigen()[0] for _, _, G, _, _ in requests])
    C = torch.stack([k.C if full else k.K for k in consts])
    e2 = torch.stack([k.e2 for k in consts])
    e3 = torch.stack([k.e3 for k in consts])
    c = torch.tensor([k.c for k in consts], dtype=Ua.dtype, device=Ua.device).view(-1, 1, 1)
    stack = _PairStack(consts, Ua, Ug, C, e2, e3, c)
    _STACKS[first] = stack
    return stack


def _batched_solve(requests: list[SolveRequest], full: bool) -> list[Direction]:
    """:func:`_spectral_solve` for ``k`` pairs of one shape, as batched products.

    With ``V`` ``(k, d_G, d_A)`` and the notation of :func:`_spectral_solve`: both low rank,
    ``D = c V + U_G R₁ + M₂ U_Aᵀ``; both full, ``D = U_G (Z ∘ C) U_Aᵀ``.
    """
    st = _pair_stack(requests, full)
    per_block = zip(*(blocks for blocks, *_ in requests))
    cols = [torch.stack(bs) for bs in per_block]  # each (k, d_G, w_j)
    V = torch.cat(cols, dim=2) if len(cols) > 1 else cols[0]
    UgT, UaT = st.Ug.mT, st.Ua.mT
    if full:
        Z = torch.bmm(torch.bmm(UgT, V), st.Ua)
        W = Z * st.C
        D = torch.bmm(torch.bmm(st.Ug, W), UaT)
        inner = (Z * W).sum((1, 2))
    else:
        X = torch.bmm(UgT, V)  # (k, r_G, d_A)
        Y = torch.bmm(V, st.Ua)  # (k, d_G, r_A)
        R1 = torch.baddbmm(st.e2 * X, torch.bmm(X, st.Ua).mul_(st.C), UaT)
        M2 = Y * st.e3
        inner = ((V * V).sum((1, 2)) * st.c.view(-1) + (X * R1).sum((1, 2))
                 + (Y * M2).sum((1, 2)))
        D = torch.baddbmm(torch.baddbmm(V * st.c, st.Ug, R1), M2, UaT)
    widths = [b.shape[1] for b in requests[0][0]]
    return [Direction(list(D[i].split(widths, dim=1)), 1.0, None, None, inner[i])
            for i in range(len(requests))]


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
