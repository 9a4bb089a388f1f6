"""The per-channel scale-and-shift block of normalization layers: exact 2×2 per channel
(``1 × 1`` for a scale alone: RMSNorm, LayerNorm without bias).

A normalization layer computes ``y = γ ⊙ x̂ + β`` with ``C`` channels. The per-sample gradients of
one channel's pair are ``u_c = Σ_t g_{t,c} x̂_{t,c}`` (for ``γ_c``) and ``v_c = Σ_t g_{t,c}`` (for
``β_c``), summed over the sample's positions ``t``. The block keeps, for every channel, the exact
``2 × 2`` second moment ``M_c = E[(u_c, v_c)(u_c, v_c)ᵀ]`` (an EMA like the Kronecker factors),
i.e. the per-channel diagonal blocks of the Fisher of ``(γ, β)`` — not a Kronecker
approximation. The damped solve is ``(M_c + λ I)⁻¹ (∇γ_c, ∇β_c)`` channel by channel. A layer
with a scale only keeps ``E[u_c²]`` (``width = 1``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..factors import Direction, FactorRefreshError, FactorUpdate, KroneckerFactor
from ..norms import all_finite
from .base import CurvatureBlock, LayerStatistics


def solve_pairs(M: Tensor, V: Tensor, damping: float | Tensor) -> Tensor:
    """``(M_c + λ_c I)⁻¹ V_c`` for ``M`` ``(C, k, k)``, ``V`` ``(C, k)``, ``k ∈ {1, 2}``
    (closed-form inverses; ``damping`` a number or one per channel, ``(C,)``)."""
    if M.shape[1] == 1:
        return V / (M[:, 0] + (damping.unsqueeze(1) if isinstance(damping, Tensor) else damping))
    a, b = M[:, 0, 0] + damping, M[:, 0, 1]
    c, d = M[:, 1, 0], M[:, 1, 1] + damping
    det = a * d - b * c
    x, y = V[:, 0], V[:, 1]
    return torch.stack([(d * x - b * y) / det, (a * y - c * x) / det], dim=1)


class ScaleShiftFactor(KroneckerFactor):
    """``C`` exact ``k × k`` moments ``M_c`` (``k = width``: 2 for scale and shift, 1 for a
    scale alone), updated from per-sample rows ``(n, kC)`` = ``[u_1..u_C, v_1..v_C]``;
    ``dim = kC``. Not a strategy (not registered): the state of a :class:`ScaleShiftBlock`."""

    name = "scale_shift"
    state_keys = ("M",)
    statistics_keys = ("M",)

    def __init__(self, dim: int, options: Any = None, width: int = 2, **kwargs: Any) -> None:
        super().__init__(dim, options, **kwargs)
        if width not in (1, 2) or self.dim % width:
            raise ValueError(f"a scale-and-shift factor has width 1 or 2 and dim = width·C, got "
                             f"width={width}, dim={dim}")
        self.width = width
        self.channels = self.dim // width
        self.M = torch.zeros(self.channels, width, width, dtype=self.dtype, device=self.device)

    def _update(self, rows: Tensor, new_weight: float, keep: float,
                sq_norm: float | None = None) -> None:
        uv = rows.reshape(rows.shape[0], self.width, self.channels)  # (n, k, C)
        S = torch.einsum("nic,njc->cij", uv, uv)
        self.M = torch.add(self.M * keep, S, alpha=new_weight)

    def trace(self) -> float:
        return float(self.M.diagonal(dim1=-2, dim2=-1).sum())

    def refresh(self, damping: float) -> None:
        if not all_finite([self.M]):
            raise FactorRefreshError(f"scale-and-shift factor (C={self.channels}): non-finite")
        self.damping = float(damping)
        self.refreshed = True

    def solve_pairs(self, V: Tensor, damping: float) -> Tensor:
        """``(M_c + λ I)⁻¹ V_c`` for ``V`` ``(C, k)`` (closed-form 2×2 or 1×1 inverses)."""
        return solve_pairs(self.M, V, damping)

    def inv_matmul(self, v: Tensor) -> Tensor:
        """``(F + δ I)⁻¹ v`` for ``v`` ``(kC, n)`` in the ``[γ; β]`` layout."""
        C, k = self.channels, self.width
        cols = [self.solve_pairs(v[:, j].reshape(k, C).T, self.damping)
                for j in range(v.shape[1])]
        return torch.stack([c.T.reshape(-1) for c in cols], dim=1)

    def to_dense(self) -> Tensor:
        """``(kC, kC)`` in the ``[γ; β]`` layout."""
        C, k = self.channels, self.width
        out = self.M.new_zeros(k * C, k * C)
        idx = torch.arange(C, device=self.M.device)
        for i in range(k):
            for j in range(k):
                out[i * C + idx, j * C + idx] = self.M[:, i, j]
        return out

    def eigenvalues(self) -> Tensor:
        return torch.linalg.eigvalsh(self.M.double()).flatten().sort(descending=True).values.to(
            self.dtype)

    def cost(self) -> float:
        return float(self.channels)

    def describe(self) -> str:
        if self.width == 1:
            return f"scale(C={self.channels}, 1x1 each)"
        return f"scale_shift(C={self.channels}, 2x2 each)"


class ScaleShiftBlock(CurvatureBlock):
    """The exact per-channel 2×2 Fisher blocks of ``(γ, β)`` (see the module docstring).

    The gradient's column blocks are ``[∇γ (C, 1), ∇β (C, 1)]`` (``d_G = C``, ``d_A = 2``;
    ``[∇γ]`` and ``d_A = 1`` for a scale alone)."""

    def __init__(self, factor: ScaleShiftFactor) -> None:
        self.factor = factor
        self.factors = (factor,)

    def stage(self, stats: LayerStatistics, decay: float) -> list[FactorUpdate]:
        return [FactorUpdate(self.factor, stats.g, stats.g_scale, stats.g_sq)]

    def refresh(self, damping: float) -> None:
        if self.factor.updates == 0:
            return
        self.factor.refresh(damping)

    def solve(self, blocks: list[Tensor], damping: float,
              norm2: Tensor | None = None) -> Direction:
        V = torch.cat(blocks, dim=1)
        return Direction.from_dense(blocks, self.factor.solve_pairs(V, damping))

    @classmethod
    def solve_many(cls, requests: list[tuple[CurvatureBlock, list[Tensor], float,
                                             Tensor | None]]) -> list[Direction]:
        """Blocks of equal width and dtype solved as one: their channels stacked, ``(ΣC, k)``."""
        out: list[Direction | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, (block, blocks, _, _) in enumerate(requests):
            f = block.factor  # type: ignore[attr-defined]
            groups.setdefault((f.width, f.dtype, f.device, len(blocks)), []).append(i)
        for idx in groups.values():
            if len(idx) == 1:
                block, blocks, damping, norm2 = requests[idx[0]]
                out[idx[0]] = block.solve(blocks, damping, norm2)
                continue
            factors = [requests[i][0].factor for i in idx]  # type: ignore[attr-defined]
            sizes = [f.channels for f in factors]
            M = torch.cat([f.M for f in factors])
            lam = torch.cat([f.M.new_full((f.channels,), requests[i][2])
                             for i, f in zip(idx, factors)])
            V = torch.cat([torch.cat(requests[i][1], dim=1) for i in idx])  # (ΣC, k)
            D = solve_pairs(M, V, lam)
            inner = (V * D).sum(1).split(sizes)
            for i, Di, s in zip(idx, D.split(sizes), inner):
                out[i] = Direction(list(Di.split(1, dim=1)), 1.0, None, None, s.sum())
        return out  # type: ignore[return-value]

    def matvec(self, V: Tensor) -> Tensor:
        return torch.einsum("cij,cj->ci", self.factor.M, V)

    def diagonal(self) -> Tensor:
        return self.factor.M.diagonal(dim1=-2, dim2=-1)

    @property
    def size(self) -> int:
        return self.factor.dim

    def top_eigenvalues(self, k: int) -> Tensor:
        return self.factor.eigenvalues().double().clamp_min(0)[:k]

    def trace(self) -> float:
        return self.factor.trace()

    def logdet(self, damping: float) -> float:
        e = self.factor.eigenvalues().double().clamp_min(0)
        return float(torch.log(e + damping).sum()) if damping > 0 else (
            float(e.log().sum()) if bool((e > 0).all()) else -math.inf)

    def describe(self) -> str:
        return self.factor.describe()
