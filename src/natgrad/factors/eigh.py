"""Dense eigendecomposition ``F = Q diag(λ) Qᵀ`` (the K-FAC default): ``O(d³)`` per refresh.

Two ways to refresh (:class:`EighOptions`): a fresh ``eigh`` every time, or SOAP's (Vyas et al.
2024) — a full ``eigh`` at the first refresh, then one step of orthogonal (subspace) iteration
from the previous basis per refresh::

    Q ← Q[:, π]   (π orders the Rayleigh quotients diag(Qᵀ F Q), descending)
    Q R = F Q     (a QR decomposition; signs so that diag(R) ≥ 0)
    λ = diag(Qᵀ F Q), columns ordered by it (descending)

two ``d × d`` products and a QR instead of an ``eigh`` (whose tridiagonal reduction runs
mostly in matrix-vector products). On a fixed ``F`` repeated refreshes converge to the
eigenbasis (column ``i`` at the rate ``max(λ_{i+1}/λ_i, λ_i/λ_{i−1})``); while ``F`` drifts the
basis lags behind it, and ``λ`` are the Rayleigh quotients of the basis held (exact when it is
an eigenbasis). Meant for users of the basis itself (``KFAC(eigen_adam=...)``, whose second
moment is indexed by the eigenvalue's rank, as the columns here); a K-FAC solve with a lagging
basis applies ``(Q diag(λ) Qᵀ + δ I)⁻¹``, not ``(F + δ I)⁻¹``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from ..norms import all_finite
from .base import DenseFactor, KroneckerFactor
from .options import FactorOptions, check_choice

#: the accepted :attr:`EighOptions.refresh` values
REFRESHES = ("eigh", "power")


@dataclasses.dataclass(frozen=True)
class EighOptions(FactorOptions):
    """Options of the ``eigh`` strategy.

    Args:
        refresh: ``"eigh"`` (default: a full eigendecomposition at every refresh) or
            ``"power"`` (SOAP's: a full one at the first refresh, then one step of orthogonal
            iteration ``Q R = F Q`` from the previous basis; module docstring).
    """

    refresh: str = "eigh"

    def __post_init__(self) -> None:
        check_choice("refresh", self.refresh, REFRESHES)


def power_refresh(F: Tensor, Q: Tensor) -> tuple[Tensor, Tensor]:
    """One step of orthogonal iteration from the basis ``Q`` (``d × d``, orthonormal columns)
    for the symmetric ``F`` (``d × d``): the columns of ``Q`` ordered by their Rayleigh
    quotients, ``Q' R = F Q`` with ``diag(R) ≥ 0``; returns ``(Q', λ)`` with ``λ = diag(Q'ᵀ F
    Q')`` clamped at 0 and both ordered by ``λ``, descending."""
    FQ = F @ Q
    order = torch.argsort((Q * FQ).sum(0), descending=True)
    Qn, R = torch.linalg.qr(FQ[:, order])
    sign = torch.where(R.diagonal() < 0, -1.0, 1.0).to(Qn.dtype)
    Qn = Qn * sign
    lam = (Qn * (F @ Qn)).sum(0)
    order = torch.argsort(lam, descending=True)
    return Qn[:, order], lam[order].clamp_min(0.0)


class EighFactor(DenseFactor):
    name = "eigh"
    spectral = True
    Options = EighOptions
    state_keys = ("F", "Q", "lam")

    def __init__(self, dim: int, options: Any = None, **kwargs: Any) -> None:
        super().__init__(dim, options, **kwargs)
        self.Q = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        self.lam = torch.zeros(self.dim, dtype=self.dtype, device=self.device)

    def _compute_inverse(self, damping: float, dtype: torch.dtype) -> dict[str, Any]:
        if self.options.refresh == "power" and self.refreshed:
            Q, lam = power_refresh(self.F.to(dtype), self.Q.to(dtype))
            return {"Q": Q, "lam": lam}
        lam, Q = torch.linalg.eigh(self.F.to(dtype))
        return {"Q": Q.flip(1), "lam": lam.flip(0).clamp_min(0.0)}

    @classmethod
    def refresh_batch(cls, factors: list[KroneckerFactor], dampings: list[float]) -> None:
        """One batched ``eigh`` of the stacked ``(b, d, d)`` moments when every factor is an
        :class:`EighFactor` of one size, dtype and device (the groups of a depthwise
        convolution: hundreds of ``10 × 10`` decompositions in one call); a failure or a
        non-finite result anywhere falls back to :meth:`refresh` one by one (its float64 retry
        and error), so the outcome is that of the loop. Power refreshes
        (``refresh="power"`` after the first) go one by one."""
        f0 = factors[0] if factors else None
        if f0 is None or len(factors) < 2 or any(
                type(f) is not EighFactor or (f.dim, f.dtype, f.device)
                != (f0.dim, f0.dtype, f0.device)
                or (f.options.refresh == "power" and f.refreshed) for f in factors):
            return super().refresh_batch(factors, dampings)
        try:
            lam, Q = torch.linalg.eigh(torch.stack([f.F for f in factors]))
        except RuntimeError:
            lam = None
        if lam is None or not all_finite([lam, Q]):
            return super().refresh_batch(factors, dampings)
        lam, Q = lam.flip(-1).clamp_min(0.0), Q.flip(-1)
        for i, (f, damping) in enumerate(zip(factors, dampings, strict=True)):
            f.Q, f.lam = Q[i], lam[i]
            f.damping = float(damping)
            f.refreshed = True
        return None

    def eigen(self) -> tuple[Tensor, Tensor, float]:
        return self.Q, self.lam, 0.0

    def release_statistics(self) -> None:
        """Free the dense moment ``F`` of a refreshed factor that is never updated again (the
        analysis' K-FAC operators: one ``d × d`` matrix less per factor, as much as a vector of
        ``P`` for a wide layer). Products, eigenvalues, the trace and the diagonal then come from
        ``F = Q diag(λ) Qᵀ`` (kept: ``tr F`` and ``diag F`` as they were); an update raises."""
        if not self.refreshed:
            raise RuntimeError(f"eigh factor (d={self.dim}): refresh before releasing F")
        if self.F is None:
            return
        self._trace, self._diag = float(self.F.diagonal().sum()), self.F.diagonal().clone()
        self.F = None  # type: ignore[assignment]

    def _ema(self, *args: Any, **kwargs: Any) -> None:
        if self.F is None:
            raise RuntimeError(f"eigh factor (d={self.dim}): its statistics were released "
                               "(release_statistics), it cannot be updated")
        super()._ema(*args, **kwargs)

    def trace(self) -> float:
        return self._trace if self.F is None else super().trace()

    def to_dense(self) -> Tensor:
        if self.F is None:
            return (self.Q * self.lam) @ self.Q.T
        return self.F

    def dense_diagonal(self) -> Tensor:
        return self._diag if self.F is None else self.F.diagonal()

    def inv_matmul(self, v: Tensor) -> Tensor:
        return self.Q @ ((self.Q.T @ v) / (self.lam + self.damping).unsqueeze(-1))

    def eigenvalues(self) -> Tensor:
        return self.lam

    def cost(self) -> float:
        return float(self.dim) ** 3  # the dense eigh (or the products and QR) dominates

    def describe(self) -> str:
        return (f"eigh(d={self.dim}, power)" if self.options.refresh == "power"
                else super().describe())
