"""Projected Kronecker factor: ``F ≈ U diag(λ) Uᵀ + σ (I − U Uᵀ)`` kept in ``O(d·r)`` memory.

``U`` is an orthonormal ``(d, r)`` basis of the dominant subspace, ``λ`` its ``r`` eigenvalues and
``σ`` one scalar for the remaining ``d − r`` directions, chosen so that the trace is preserved:
``σ = max(0, (tr F − Σλ) / (d − r))`` with ``tr F`` tracked exactly (an EMA of
``scale · ‖X‖_F²``).

Recursive refresh (Rayleigh–Ritz on an augmented basis, Brand-style). Given the batch rows ``X``
(``(n, d)``) and the EMA weights ``F_new = keep · F̃ + w · Xᵀ X``:

1. sketch the new directions: ``Y = Xᵀ Ω`` with a Gaussian ``Ω`` (``(n, k)``), or ``k`` random rows
   of ``X`` (``sketch="rows"``); when ``n ≤ k`` the rows themselves are used (no sketch);
2. ``Z = [U, Q]`` with ``Q`` an orthonormal basis of ``(I − U Uᵀ) Y`` (Gram/eigh orthogonalisation
   done twice; numerically dependent directions are dropped), so ``Z`` is ``(d, r + k')``;
3. the compressed matrix is exact for ``F_new`` restricted to ``span Z``:
   ``M = Zᵀ F_new Z = keep · blockdiag(diag(λ), σ I) + w · (X Z)ᵀ (X Z)``;
4. ``M = V diag(μ) Vᵀ`` (a small float64 ``eigh``); the new ``U = Z V[:, :r]``, ``λ = μ[:r]``,
   and ``σ`` follows from the tracked trace.

Cost per update ``O(n·d·(r + k) + d·(r + k)²)`` — linear in ``d`` — and never a ``d × d`` matrix.
With ``r = d`` (or whenever the factor's true rank is ``≤ r``) the representation is exact, so
projected K-FAC reproduces dense K-FAC; :meth:`ProjectedFactor.create` returns an exact
:class:`~natgrad.factors.eigh.EighFactor` for layers no wider than the rank.

The sketch is drawn from a generator seeded with ``(seed, updates)``, so a run resumed from a
checkpoint continues identically. The inverse needs no refresh: ``(F̃ + δ I)⁻¹ v =
U diag(1/(λ + δ)) Uᵀ v + (v − U Uᵀ v) / (σ + δ)`` in ``O(d·r)`` per vector.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from .base import KroneckerFactor, _finite
from .eigh import EighFactor

SKETCHES = ("gaussian", "rows")


def _check_int(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"invalid {name}={value!r}: expected an integer >= {low}")
    return int(value)


def small_eigh(M: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` of a small matrix on one thread.

    Multi-threaded LAPACK gains nothing on ``(r + k)²`` matrices and, on a loaded machine with
    few cores, its thread barriers can make a 0.8 ms call take hundreds of milliseconds.
    """
    threads = torch.get_num_threads()
    if threads == 1 or M.device.type != "cpu":
        return torch.linalg.eigh(M)
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(M)
    finally:
        torch.set_num_threads(threads)


def _orth_complement(Y: Tensor, U: Tensor, tol: float) -> Tensor:
    """Orthonormal basis of ``(I − U Uᵀ) Y`` with dependent directions dropped.

    Args:
        Y: ``(d, k)`` candidate directions.
        U: ``(d, r)`` orthonormal basis (``r`` may be 0).
        tol: squared singular values below ``tol · ‖Y‖_F²`` count as zero.

    Returns:
        ``(d, k')`` with ``k' ≤ k`` orthonormal columns orthogonal to ``U``.
    """
    ref = float((Y * Y).sum())
    if ref == 0.0 or not math.isfinite(ref):
        return Y[:, :0]
    Q = Y
    for _ in range(2):  # "twice is enough" (Gram–Schmidt against U, then Gram/eigh)
        if U.shape[1]:
            Q = Q - U @ (U.T @ Q)
        gram = (Q.T @ Q).double()
        s, W = small_eigh(gram)
        keep = s > tol * ref
        if not bool(keep.any()):
            return Y[:, :0]
        W = W[:, keep] / s[keep].sqrt()
        Q = Q @ W.to(Q.dtype)
        ref = float(Q.shape[1])  # after the first pass the columns have unit norm
    return Q


class ProjectedFactor(KroneckerFactor):
    """Low-rank-plus-scaled-identity factor refreshed by Rayleigh–Ritz (see the module docstring).

    Args:
        dim: ``d``.
        rank: ``r``, the number of kept eigenpairs (used when ``energy`` is ``None``).
        energy: keep the smallest rank whose eigenvalues explain this fraction of the trace
            (``(0, 1]``), at most ``max_rank``; chosen per layer at every update.
        max_rank: cap of the rank in ``energy`` mode (default: ``rank``).
        sketch_size: ``k``, new directions per update (default: twice the rank cap); rows beyond
            ``k`` are sketched.
        sketch: ``"gaussian"`` (``Xᵀ Ω``) or ``"rows"`` (``k`` random rows of ``X``).
        max_rows: subsample this many rows (e.g. spatial locations of a conv layer) for the
            Rayleigh–Ritz projection, reweighted to stay unbiased; the trace always uses all rows.
        seed: seed of the sketches.
        dtype, device: as :class:`~natgrad.factors.base.KroneckerFactor`.
    """

    name = "projected"
    spectral = True
    state_keys = ("U", "lam", "sigma", "tr")

    def __init__(
        self,
        dim: int,
        *,
        rank: int = 64,
        energy: float | None = None,
        max_rank: int | None = None,
        sketch_size: int | None = None,
        sketch: str = "gaussian",
        max_rows: int | None = None,
        seed: int = 0,
        **options: Any,
    ) -> None:
        opts = self.check_options(rank, energy, max_rank, sketch_size, sketch, max_rows, seed)
        super().__init__(dim, **options)
        self.rank, self.energy, self.max_rank = opts["rank"], opts["energy"], opts["max_rank"]
        self.rank_cap = min(self.max_rank if self.energy is not None else self.rank, self.dim)
        self.sketch_size = opts["sketch_size"] or 2 * self.rank_cap
        self.sketch = sketch
        self.max_rows = max_rows
        self.seed = seed
        self.U = torch.zeros(self.dim, 0, dtype=self.dtype, device=self.device)
        self.lam = torch.zeros(0, dtype=self.dtype, device=self.device)
        self.sigma = 0.0
        self.tr = 0.0
        self._tol = 100.0 * torch.finfo(self.dtype).eps

    @staticmethod
    def check_options(
        rank: int = 64,
        energy: float | None = None,
        max_rank: int | None = None,
        sketch_size: int | None = None,
        sketch: str = "gaussian",
        max_rows: int | None = None,
        seed: int = 0,
    ) -> dict[str, Any]:
        """Validate the strategy options (``ValueError`` naming the option and accepted range)."""
        rank = _check_int("rank", rank)
        if energy is not None:
            if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not (
                0.0 < energy <= 1.0
            ):
                raise ValueError(f"invalid energy={energy!r}: expected None or a number in (0, 1]")
            energy = float(energy)
        max_rank = rank if max_rank is None else _check_int("max_rank", max_rank)
        if sketch_size is not None:
            sketch_size = _check_int("sketch_size", sketch_size)
        if sketch not in SKETCHES:
            raise ValueError(f"invalid sketch={sketch!r}: accepted values: {list(SKETCHES)}")
        if max_rows is not None:
            max_rows = _check_int("max_rows", max_rows)
        _check_int("seed", seed, low=0)
        return {"rank": rank, "energy": energy, "max_rank": max_rank, "sketch_size": sketch_size}

    @classmethod
    def create(cls, dim: int, **options: Any) -> KroneckerFactor:
        """A projected factor, or an exact :class:`EighFactor` when ``dim ≤`` the rank cap."""
        keys = ("rank", "energy", "max_rank", "sketch_size", "sketch", "max_rows", "seed")
        mine = {k: options.pop(k) for k in keys if k in options}
        opts = cls.check_options(**mine)
        cap = opts["max_rank"] if opts["energy"] is not None else opts["rank"]
        if dim <= cap:
            return EighFactor(dim, **options)
        return cls(dim, **mine, **options)

    # ------------------------------------------------------------------ statistics
    def _generator(self) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.seed * 1_000_003 + self.updates)
        return gen

    def _update(self, rows: Tensor, new_weight: float, keep: float) -> None:
        n = rows.shape[0]
        new_tr = keep * self.tr + new_weight * float(rows.double().pow(2).sum())
        gen = None
        if self.max_rows is not None and n > self.max_rows:  # unbiased row subsample
            gen = self._generator()
            idx = torch.randperm(n, generator=gen, device=self.device)[: self.max_rows]
            new_weight = new_weight * n / self.max_rows
            rows, n = rows[idx], self.max_rows
        U = self.U if keep > 0 else self.U[:, :0]
        k = self.sketch_size
        if n <= k:
            Y = rows.T
        else:
            gen = gen or self._generator()
            if self.sketch == "gaussian":
                omega = torch.randn(n, k, generator=gen, device=self.device, dtype=self.dtype)
                Y = rows.T @ omega
            else:
                Y = rows[torch.randperm(n, generator=gen, device=self.device)[:k]].T
        Q = _orth_complement(Y, U, self._tol)
        Z = torch.cat([U, Q], dim=1)  # (d, r + k')
        B = rows @ Z  # (n, r + k')
        M = new_weight * (B.T @ B).double()
        if keep > 0:
            diag = torch.cat([self.lam.double(), M.new_full((Q.shape[1],), self.sigma)])
            M = M + torch.diag(keep * diag)
        M = 0.5 * (M + M.T)
        mu, V = small_eigh(M)
        mu, V = mu.flip(0).clamp_min(0.0), V.flip(1)
        r = self._choose_rank(mu, new_tr)
        U_new = Z @ V[:, :r].to(self.dtype)
        lam = mu[:r]
        if not (_finite(U_new) and _finite(lam) and math.isfinite(new_tr)):
            warnings.warn(
                f"projected factor (d={self.dim}): non-finite subspace update skipped",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        self.U = self._polish(U_new)
        self.lam = lam.to(self.dtype)
        self.tr = new_tr
        rest = self.dim - r
        self.sigma = max(0.0, (new_tr - float(lam.sum())) / rest) if rest > 0 else 0.0

    def _choose_rank(self, mu: Tensor, tr: float) -> int:
        r = min(self.rank_cap, mu.numel())
        if self.energy is not None and r > 0:
            need = self.energy * tr
            csum = mu.cumsum(0)
            reach = int((csum < need * (1 - 1e-12)).sum()) + 1
            r = min(r, reach)
        return max(r, min(1, mu.numel()))

    def _polish(self, U: Tensor) -> Tensor:
        """Re-orthonormalise ``U`` when rounding has drifted (``O(d·r²)``, rarely needed)."""
        if U.shape[1] == 0:
            return U
        C = (U.T @ U).double()
        eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
        if float((C - eye).abs().max()) <= self._tol:
            return U
        s, W = small_eigh(C)
        return U @ (W / s.clamp_min(1e-30).sqrt() @ W.T).to(U.dtype)

    def trace(self) -> float:
        return float(self.tr)

    # ------------------------------------------------------------------ inverse
    def _compute_inverse(self, damping: float, dtype: torch.dtype) -> dict[str, Any]:
        # nothing to decompose: the representation is its own inverse; only check finiteness
        return {"U": self.U, "lam": self.lam}

    def eigen(self) -> tuple[Tensor, Tensor, float]:
        return self.U, self.lam, float(self.sigma)

    def inv_matmul(self, v: Tensor) -> Tensor:
        Utv = self.U.T @ v
        out = self.U @ (Utv / (self.lam + self.damping).unsqueeze(-1))
        if self.U.shape[1] < self.dim:
            out = out + (v - self.U @ Utv) / (self.sigma + self.damping)
        return out

    # ------------------------------------------------------------------ inspection
    def to_dense(self) -> Tensor:
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        UUt = self.U @ self.U.T
        return (self.U * self.lam) @ self.U.T + self.sigma * (eye - UUt)

    def eigenvalues(self) -> Tensor:
        rest = self.lam.new_full((self.dim - self.lam.numel(),), self.sigma)
        return torch.cat([self.lam, rest]).sort(descending=True).values

    @property
    def current_rank(self) -> int:
        """Number of eigenpairs currently kept."""
        return int(self.U.shape[1])

    def describe(self) -> str:
        if self.energy is not None:
            return f"projected(d={self.dim}, energy={self.energy:g}, r<={self.rank_cap})"
        return f"projected(d={self.dim}, r={self.rank_cap})"
