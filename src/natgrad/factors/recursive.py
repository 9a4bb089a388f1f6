"""Recursive inverse: a dense ``P = (F + δ I)⁻¹`` updated with Woodbury, ``O(d²·n)`` per update.

State: the dense EMA ``F`` (exact; ``O(d²)`` memory) and ``P``.

**Update.** With ``D = F + δ_eff I`` and ``F ← keep·F + w·Xᵀ X`` (``X`` is ``(n, d)``), the
Woodbury identity gives the inverse of ``keep·D + w·Xᵀ X`` exactly:

    ``P ← (P − Yᵀ S⁻¹ Y) / keep``,  ``Y = X P``,  ``S = (keep / w) I_n + Y Xᵀ``  (``n × n``).

**Damping.** ``keep·D + w Xᵀ X = F_new + keep·δ_eff I``: the damping inside ``P`` decays by ``keep``
at every update, because re-injecting the missing ``(1 − keep) δ I`` is a full-rank change that no
Woodbury step can make. We therefore *track* the damping that ``P`` really contains, ``δ_eff``
(stored as :attr:`RecursiveFactor.damping`, so ``P = (F + damping·I)⁻¹`` holds to rounding at all
times and :meth:`inv_matmul` applies exactly that), and re-inject by an exact Cholesky refresh
(``O(d³/3)``) whenever ``δ_eff / δ`` leaves ``[1 / damping_tol, damping_tol]`` — after any update
(so the damping actually applied stays in that band at every step, whatever ``inverse_every``)
and when :meth:`RecursiveFactor.refresh` asks for another ``δ``. :meth:`state_summary` reports
``δ_eff``. The π-split damping of
:func:`~natgrad.factors.kronecker.refresh_pair` changes a little at every refresh (it follows the
factors' traces); those small changes are absorbed by the same band. ``damping_tol=1`` gives an
exact refresh whenever the damping differs. With the K-FAC default ``keep = 0.95`` and the default
band of 2, the exact refresh runs about once every 14 updates.

**Guards.** ``P`` is symmetrised after each step; a failed Cholesky of ``S`` (it is SPD in exact
arithmetic), a non-positive diagonal of ``P``, a non-finite value, or a residual
``max ‖(F + δ_eff I) P z − z‖ / ‖z‖`` over a few random probes ``z`` above ``residual_tol`` triggers
an immediate exact refresh. When ``n`` is large compared with ``d`` the Woodbury step costs more
than a refresh, and the refresh is used directly (``n > woodbury_max_rows · d``).

**Projection (optional).** With ``sketch_size=k`` and ``n > k`` the batch statistics are first
projected onto a random ``k``-dimensional range of ``Xᵀ`` (``Z = orth(Xᵀ Ω)``,
``Xᵀ X → Z Zᵀ Xᵀ X Z Zᵀ``, which is ``Lᵀ L`` for ``k`` rows ``L``), so an update costs ``O(d²·k)``.
``F`` then tracks the EMA of the projected statistics (``P`` stays exactly its inverse).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor

from ..norms import all_finite
from .base import DecomposedFactor, DenseFactor, FactorRefreshError
from .linalg import gaussian_sketch, orth_complement, small_eigh, update_generator
from .options import FactorOptions, check_int, check_optional_int, check_real


@dataclasses.dataclass(frozen=True)
class RecursiveOptions(FactorOptions):
    """Options of the recursive strategy.

    Attributes:
        damping_tol: ratio band ``≥ 1`` of the damping drift tolerated before an exact refresh.
        residual_tol: relative probe residual that triggers an exact refresh (default ``1e-4`` in
            float32, ``1e-10`` in float64).
        probes: random probe vectors of the residual check (0 disables it).
        sketch_size: project each batch to this rank first (``None``: use all rows).
        woodbury_max_rows: use an exact refresh instead of Woodbury when ``n > this · d``.
        seed: seed of the probes and sketches.
    """

    damping_tol: float = 2.0
    residual_tol: float | None = None
    probes: int = 4
    sketch_size: int | None = None
    woodbury_max_rows: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        check_real("damping_tol", self.damping_tol, lambda v: v >= 1.0, "a finite number >= 1")
        if self.residual_tol is not None:
            check_real("residual_tol", self.residual_tol, lambda v: v > 0.0,
                       "None or a finite number > 0")
        check_int("probes", self.probes, low=0)
        check_optional_int("sketch_size", self.sketch_size)
        check_real("woodbury_max_rows", self.woodbury_max_rows, lambda v: v > 0.0,
                   "a number > 0")
        check_int("seed", self.seed, low=0)


class RecursiveFactor(DenseFactor):
    """Dense inverse maintained by Woodbury updates (see the module docstring).

    Args:
        dim: ``d``.
        options: :class:`RecursiveOptions` (or a dict; single options also as keywords).
        **kwargs: ``dtype`` and ``device`` (as :class:`~natgrad.factors.base.KroneckerFactor`)
            and single options by name.
    """

    supports_moment = False  # every update must also update ``P`` (Woodbury needs the rows)
    name = "recursive"
    Options = RecursiveOptions
    state_keys = ("F", "P", "target_damping", "stale")

    def __init__(self, dim: int, options: Any = None, **kwargs: Any) -> None:
        super().__init__(dim, options, **kwargs)
        opts = self.options
        damping_tol, residual_tol, probes = opts.damping_tol, opts.residual_tol, opts.probes
        sketch_size, woodbury_max_rows, seed = (opts.sketch_size, opts.woodbury_max_rows,
                                                opts.seed)
        self.damping_tol = float(damping_tol)
        self.residual_tol = (
            float(residual_tol)
            if residual_tol is not None
            else (1e-10 if self.dtype == torch.float64 else 1e-4)
        )
        self.probes = probes
        self.sketch_size = sketch_size
        self.woodbury_max_rows = float(woodbury_max_rows)
        self.seed = seed
        self.P = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        #: the damping last asked for by :meth:`refresh` (``self.damping`` is the one inside ``P``)
        self.target_damping = 0.0
        #: ``P`` does not match ``F`` (before the first refresh, or after a failed step)
        self.stale = True
        #: exact refreshes done (initial, damping drift, guards); for diagnostics
        self.exact_refreshes = 0

    # ------------------------------------------------------------------ statistics
    def _project(self, rows: Tensor, gen: torch.Generator) -> Tensor:
        """``k`` rows ``L`` with ``Lᵀ L = Z Zᵀ Xᵀ X Z Zᵀ`` for a random rank-``k`` range ``Z``."""
        k = self.sketch_size
        assert k is not None
        omega = torch.randn(rows.shape[0], k, generator=gen, device=self.device, dtype=self.dtype)
        tol = 100.0 * torch.finfo(self.dtype).eps
        Z = orth_complement(gaussian_sketch(rows, omega), rows[:0].T, tol)
        B = rows @ Z  # (n, k')
        C = (B.T @ B).double()
        s, W = small_eigh(0.5 * (C + C.T))
        L = (W * s.clamp_min(0.0).sqrt()).T  # (k', k'), LᵀL = C
        return L.to(self.dtype) @ Z.T

    def _update(
        self, rows: Tensor, new_weight: float, keep: float, sq_norm: float | None = None
    ) -> None:
        gen = update_generator(self)
        if self.sketch_size is not None and rows.shape[0] > self.sketch_size:
            rows = self._project(rows, gen)
        super()._update(rows, new_weight, keep)  # F ← keep·F + w·XᵀX (exact)
        if self.stale or keep == 0.0:
            self.stale = True
            self._try_exact()
            return
        if new_weight == 0.0:
            self.P = self.P / keep
            self.damping *= keep
            if not self._in_target_band():
                self._try_exact()
            return
        if rows.shape[0] > self.woodbury_max_rows * self.dim:
            self._try_exact()
            return
        P_new = self._woodbury(rows, new_weight, keep)
        if P_new is None:
            self._try_exact()
            return
        self.P = P_new
        self.damping *= keep
        if self.residual(gen) > self.residual_tol or not self._in_target_band():
            self._try_exact()

    def _in_target_band(self) -> bool:
        """Whether the damping inside ``P`` is still within the band around the damping last asked
        for; an update that leaves it re-injects the damping at once (exact refresh), so the
        applied damping stays in ``[δ / damping_tol, δ · damping_tol]`` at every step."""
        return self.target_damping <= 0.0 or self._within_band(self.damping,
                                                               self.target_damping)

    def _woodbury(self, X: Tensor, w: float, keep: float) -> Tensor | None:
        """``(keep·(F_old + δ I) + w XᵀX)⁻¹`` from ``P``, or ``None`` when a guard fails."""
        Y = X @ self.P  # (n, d)
        S = Y @ X.T
        S = 0.5 * (S + S.T)
        S.diagonal().add_(keep / w)
        L, info = torch.linalg.cholesky_ex(S)
        if int(info) != 0:
            return None
        SiY = torch.cholesky_solve(Y, L)  # S⁻¹ Y, (n, d)
        P = torch.addmm(self.P, Y.T, SiY, alpha=-1.0 / keep, beta=1.0 / keep)
        P = 0.5 * (P + P.T)
        if not all_finite([P]) or not bool((P.diagonal() > 0).all()):
            return None
        return P

    def residual(self, gen: torch.Generator | None = None) -> float:
        """``max ‖(F + δ_eff I) P z − z‖ / ‖z‖`` over :attr:`probes` Gaussian probes ``z``."""
        if self.probes == 0:
            return 0.0
        gen = gen or update_generator(self)
        z = torch.randn(self.dim, self.probes, generator=gen, device=self.device, dtype=self.dtype)
        Pz = self.P @ z
        r = self.F @ Pz + self.damping * Pz - z
        return float((r.norm(dim=0) / z.norm(dim=0)).max())

    def _try_exact(self) -> None:
        """Exact refresh at the target damping; on failure ``P`` is marked stale (kept as is)."""
        if self.target_damping <= 0.0 and not self.refreshed:
            self.stale = True  # no damping known yet: wait for the first refresh()
            return
        try:
            self._exact(self.target_damping)
        except FactorRefreshError:
            self.stale = True

    def _exact(self, damping: float) -> None:
        DecomposedFactor.refresh(self, damping)  # working precision, then float64
        self.exact_refreshes += 1

    # ------------------------------------------------------------------ inverse
    def refresh(self, damping: float) -> None:
        """Make ``P`` usable for damping ``δ``: free when the tracked damping is within the band.

        Otherwise (first call, stale ``P``, drift beyond ``damping_tol``) an exact Cholesky
        refresh; its failure raises :class:`FactorRefreshError` and keeps the previous ``P``.
        """
        if not (self.stale or not self.refreshed or not self._within_band(self.damping, damping)):
            self.target_damping = float(damping)
            return
        self._exact(damping)
        self.target_damping = float(damping)

    def _within_band(self, have: float, want: float) -> bool:
        if have <= 0.0 or want <= 0.0:
            return have == want
        return abs(math.log(have / want)) <= math.log(self.damping_tol) + 1e-12

    def _compute_inverse(self, damping: float, dtype: torch.dtype) -> dict[str, Any]:
        eye = torch.eye(self.dim, dtype=dtype, device=self.device)
        L = torch.linalg.cholesky(self.F.to(dtype) + damping * eye)
        P = torch.cholesky_inverse(L)
        return {"P": 0.5 * (P + P.T), "stale": False}

    def inv_matmul(self, v: Tensor) -> Tensor:
        return self.P @ v

    def state_summary(self) -> str:
        """``"damping now δ_eff"`` (the damping ``P`` holds) once refreshed."""
        return f"damping now {self.damping:.3g}" if self.refreshed else ""

    def cost(self) -> float:
        # Woodbury, O(d² k); the exact refreshes that re-inject the damping are amortised
        k = self.sketch_size if self.sketch_size is not None else self.dim
        return float(self.dim) ** 2 * min(k, self.dim)
