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
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..factors import (
    Direction,
    FactorUpdate,
    KroneckerFactor,
    kronecker_matvec,
    refresh_pair,
    solve,
)
from .base import CurvatureBlock, LayerStatistics
from .closed_forms import kron_logdet, kron_top_eigenvalues, kron_trace
from .kronecker import _diag, _label


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
        for A, G in zip(self.A, self.G):
            refresh_pair(A, G, damping)

    def _rows(self, j: int) -> slice:
        d = self.G[j].dim
        return slice(j * d, (j + 1) * d)

    def solve(self, blocks: list[Tensor], damping: float,
              norm2: Tensor | None = None) -> Direction:
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
