"""The block of a grouped convolution: one Kronecker pair per group, block diagonal over groups.

A convolution with ``g`` groups maps input channels ``[j·c_in/g, (j+1)·c_in/g)`` to output
channels ``[j·c_out/g, (j+1)·c_out/g)`` with its own weights; its layer matrix ``V`` ``(c_out,
d_A)`` (``d_A = (c_in/g)·kh·kw [+ 1]``) stacks the groups' matrices ``V_j`` ``(c_out/g, d_A)``
row-wise. The block is ``blockdiag_j(A_j ⊗ G_j)`` with ``A_j`` from group ``j``'s patch rows
and ``G_j`` from its output channels' gradients (K-FAC with every group a layer of its own; the
Fisher's cross-group blocks are left out, as between layers). Depthwise convolutions are the case
``g = c_in`` (``A_j``: ``kh·kw [+ 1]`` square, ``G_j``: ``c_out/g`` square).

The statistics arrive as rows ``(n, g·d_A)`` (group ``j``'s patch in columns ``[j·d_A, (j+1)·d_A)``)
and ``(n, c_out)``, or as dense moments of them (the analysis, a distributed reduction): a group
takes its columns of the rows, or its diagonal block of the moment.

The per-step work is batched over groups: the statistics in one ``bmm``, the refresh through
:meth:`~natgrad.factors.KroneckerFactor.refresh_batch` (one batched ``eigh`` for eigh factors),
the solve as ``(g, ·, ·)`` products over the groups' stacked eigenbases when every ``G_j`` is full
rank and the ``A_j`` have equal ranks (:class:`_Stacked`; otherwise a loop over groups).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..factors import (
    Direction,
    FactorUpdate,
    KroneckerFactor,
    kronecker_matvec,
    refresh_pair,
    solve,
    split_damping,
)
from .base import CurvatureBlock, LayerStatistics
from .closed_forms import kron_logdet, kron_top_eigenvalues, kron_trace
from .kronecker import _diag, _label


@dataclass
class _Stacked:
    """Every group's ``A_j ≈ U_A diag(μ_A) U_Aᵀ + σ_A (I − U_A U_Aᵀ)`` and full-rank
    ``G_j = Q_G diag(μ_G) Q_Gᵀ`` stacked over groups (equal ranks), for one batched solve.

    With ``V_j`` ``(d_G, d_A)``, ``X = Q_Gᵀ V_j``, ``C = 1/(μ_G μ_Aᵀ + λ)`` and ``D₂ = 1/(μ_G σ_A
    + λ)`` (a column), group ``j``'s exact ``(A_j ⊗ G_j + λ I)⁻¹ vec(V_j)`` is ``Q_G [(X U_A ∘ C)
    U_Aᵀ]`` when ``U_A`` is square, else ``Q_G [D₂ ∘ X + (X U_A ∘ (C − D₂)) U_Aᵀ]`` — the formulas
    of :func:`natgrad.factors.solve` for a full ``G``, as ``(g, ·, ·)`` batched products.

    Attributes:
        key, sigma_a: what the stack was built from (tensor identities, ``σ_A`` values).
        Ua, UaT: ``(g, d_A, r_A)`` and its transpose; mu_a ``(g, r_A)``; sig_a ``(g,)``.
        Qg: ``(g, d_G, d_G)``; mu_g ``(g, d_G)``.
        full_a: ``r_A = d_A``.
    """

    key: list[Tensor]
    sigma_a: list[float]
    Ua: Tensor
    UaT: Tensor
    mu_a: Tensor
    sig_a: Tensor
    Qg: Tensor
    mu_g: Tensor
    full_a: bool

    def solve(self, blocks: list[Tensor], damping: float) -> Tensor:
        """The dense ``(g·d_G, d_A)`` direction for the gradient's column blocks."""
        g, d_g = self.mu_g.shape
        V = torch.cat(blocks, dim=1) if len(blocks) > 1 else blocks[0]
        X = torch.bmm(self.Qg.mT, V.reshape(g, d_g, V.shape[1]))  # (g, d_G, d_A)
        if self.full_a:
            C = (self.mu_g.unsqueeze(2) * self.mu_a.unsqueeze(1)).add_(damping).reciprocal_()
            R = torch.bmm(torch.bmm(X, self.Ua).mul_(C), self.UaT)
        else:
            ext = torch.cat([self.mu_a, self.sig_a.unsqueeze(1)], dim=1)  # (g, r_A + 1)
            T = (self.mu_g.unsqueeze(2) * ext.unsqueeze(1)).add_(damping).reciprocal_()
            d2 = T[:, :, -1:]
            R = torch.baddbmm(d2 * X, torch.bmm(X, self.Ua).mul_(T[:, :, :-1] - d2), self.UaT)
        return torch.bmm(self.Qg, R).reshape(V.shape)


class GroupedKroneckerBlock(CurvatureBlock):
    """``blockdiag_j(A_j ⊗ G_j)`` over ``g`` groups (see the module docstring).

    Args:
        A, G: the groups' factors, ``g`` each (``A_j``: ``d_A``, ``G_j``: ``c_out/g``).
    """

    def __init__(self, A: list[KroneckerFactor], G: list[KroneckerFactor]) -> None:
        if not A or len(A) != len(G):
            raise ValueError(f"a grouped block needs one A and one G per group, got {len(A)} "
                             f"and {len(G)}")
        self.A, self.G = list(A), list(G)
        self.groups = len(A)
        self.factors = (*self.A, *self.G)
        self._stack_cache: _Stacked | None = None

    def _sides(self, rows: Tensor, moment: bool, width: int, j: int) -> Tensor:
        s = slice(j * width, (j + 1) * width)
        return rows[s, s] if moment else rows[:, s]

    def stage(self, stats: LayerStatistics, decay: float) -> list[FactorUpdate]:
        items = []
        for fs, rows, scale, moment in ((self.A, stats.a, stats.a_scale, stats.a_moment),
                                        (self.G, stats.g, stats.g_scale, stats.g_moment)):
            d = fs[0].dim
            if not moment and all(f.supports_moment for f in fs):
                # every group's XᵀX in one batched product instead of g strided slices
                X = rows.reshape(rows.shape[0], self.groups, d)
                if d == 1:  # depthwise G: per-channel sums of squares
                    grams = X.pow(2).sum(0).reshape(self.groups, 1, 1)
                else:
                    X = X.transpose(0, 1).contiguous()  # (g, n, d): bmm wants whole batches
                    grams = torch.bmm(X.transpose(1, 2), X)
                for f, S in zip(fs, grams):
                    f.update_moment(S, scale, decay)
                continue
            for j, f in enumerate(fs):
                part = self._sides(rows, moment, d, j)
                if moment:
                    f.update_moment(part, scale, decay)
                else:
                    items.append(FactorUpdate(f, part, scale))
        return items

    def refresh(self, damping: float) -> None:
        if any(f.updates == 0 for f in self.factors):
            return
        if any(type(f) is not type(fs[0]) for fs in (self.A, self.G) for f in fs):
            for A, G in zip(self.A, self.G):
                refresh_pair(A, G, damping)
            return
        # every group's π-split, then each side in one batched call (e.g. one eigh of (g, d, d))
        split = [split_damping(A, G, damping) for A, G in zip(self.A, self.G)]
        type(self.A[0]).refresh_batch(self.A, [da for da, _ in split])
        type(self.G[0]).refresh_batch(self.G, [dg for _, dg in split])

    def _stacked(self) -> _Stacked | None:
        """The groups' spectral representations stacked for the batched solve, or ``None`` when
        they do not stack (see :class:`_Stacked`); rebuilt only when a factor's changes."""
        if not all(f.spectral and not f.diagonal for f in self.factors):
            return None
        eig = [(A.eigen(), G.eigen()) for A, G in zip(self.A, self.G)]
        key = [t for ea, eg in eig for t in (ea[0], ea[1], eg[0], eg[1])]
        sig = [float(ea[2]) for ea, _ in eig]
        hit = self._stack_cache
        if hit is not None and hit.sigma_a == sig and len(hit.key) == len(key) and all(
                x is y for x, y in zip(hit.key, key)):
            return hit
        Ua0, Ug0 = eig[0][0][0], eig[0][1][0]
        if any(ea[0].shape != Ua0.shape or eg[0].shape != Ug0.shape or eg[0].shape[1] != G.dim
               for (ea, eg), G in zip(eig, self.G)):
            self._stack_cache = None  # unequal ranks or a low-rank G: the per-group loop
            return None
        Ua = torch.stack([ea[0] for ea, _ in eig])
        self._stack_cache = _Stacked(
            key, sig, Ua, Ua.mT.contiguous(),
            torch.stack([ea[1] for ea, _ in eig]),
            torch.tensor(sig, dtype=Ua.dtype, device=Ua.device),
            torch.stack([eg[0] for _, eg in eig]), torch.stack([eg[1] for _, eg in eig]),
            full_a=Ua0.shape[1] == self.A[0].dim)
        return self._stack_cache

    def _rows(self, j: int) -> slice:
        d = self.G[j].dim
        return slice(j * d, (j + 1) * d)

    def solve(self, blocks: list[Tensor], damping: float,
              norm2: Tensor | None = None) -> Direction:
        st = self._stacked()
        if st is not None:
            return Direction.from_dense(blocks, st.solve(blocks, damping))
        parts = [solve([b[self._rows(j)] for b in blocks], self.A[j], self.G[j], damping).dense()
                 for j in range(self.groups)]
        return Direction.from_dense(blocks, torch.cat(parts, dim=0))

    def matvec(self, V: Tensor) -> Tensor:
        return torch.cat([kronecker_matvec(V[self._rows(j)], self.A[j], self.G[j])
                          for j in range(self.groups)], dim=0)

    def diagonal(self) -> Tensor:
        return torch.cat([torch.outer(_diag(G), _diag(A)) for A, G in zip(self.A, self.G)])

    @property
    def size(self) -> int:
        return sum(A.dim * G.dim for A, G in zip(self.A, self.G))

    def top_eigenvalues(self, k: int) -> Tensor:
        each = torch.cat([kron_top_eigenvalues(A, G, k) for A, G in zip(self.A, self.G)])
        return torch.sort(each, descending=True).values[:k]

    def trace(self) -> float:
        return sum(kron_trace(A, G) for A, G in zip(self.A, self.G))

    def logdet(self, damping: float) -> float:
        return sum(kron_logdet(A, G, damping) for A, G in zip(self.A, self.G))

    def describe(self) -> str:
        return f"{self.groups} groups x (A: {self.A[0].describe()}  G: {self.G[0].describe()})"

    def summary(self) -> str:
        return f"{self.groups} groups x (A: {_label(self.A[0])}  G: {_label(self.G[0])})"
