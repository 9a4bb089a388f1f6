"""Projected Kronecker factor: ``F ≈ U diag(λ) Uᵀ + σ (I − U Uᵀ)`` kept in ``O(d·r)`` memory.

``U`` is an orthonormal ``(d, r)`` basis of the dominant subspace, ``λ`` its ``r`` eigenvalues and
``σ`` one scalar for the remaining ``d − r`` directions, chosen so that the trace is preserved:
``σ = max(0, (tr F − Σλ) / (d − r))`` with ``tr F`` tracked exactly (an EMA of
``scale · ‖X‖_F²``).

Recursive refresh (Rayleigh–Ritz on an augmented basis, Brand-style). Given the batch rows ``X``
(``(n, d)``) and the EMA weights ``F_new = keep · F̃ + w · Xᵀ X``:

1. sketch the new directions: ``Y = Xᵀ Ω`` with a Gaussian ``Ω`` (``(n, k)``), or ``k`` random rows
   of ``X`` (``sketch="rows"``); when ``n ≤ k`` the rows themselves are used (no sketch);
2. ``Z = [U, Q]`` with ``Q`` an orthonormal basis of ``(I − U Uᵀ) Y`` (Gram–Schmidt and Cholesky
   QR, each done twice; a Gram eigendecomposition drops numerically dependent directions when the
   block is close to rank deficient), so ``Z`` is ``(d, r + k')``;
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

import dataclasses
import math
import warnings
from typing import Any

import torch
from torch import Tensor

from ..norms import squared_norms, to_floats
from .base import FactorUpdate, KroneckerFactor
from .eigh import EighFactor
from .linalg import cholesky_qr2, gaussian_sketch, orth_complement, small_eigh, update_generator
from .options import FactorOptions, check_choice, check_int, check_optional_int, check_real

SKETCHES = ("gaussian", "rows")


@dataclasses.dataclass(frozen=True)
class ProjectedOptions(FactorOptions):
    """Options of the projected strategy (the one set of defaults: optimizer, analysis, benches).

    Attributes:
        rank: ``r``, the number of kept eigenpairs (used when ``energy`` is ``None``). 24 keeps
            accuracy parity with dense K-FAC on the embedded-MNIST models (docs/DISCUSSION.md)
            at a preconditioning cost linear in ``r``.
        energy: keep the smallest rank whose eigenvalues explain this fraction of the trace
            (``(0, 1]``), at most ``max_rank``; chosen per layer at every update.
        max_rank: cap of the rank in ``energy`` mode (default: ``rank``).
        sketch_size: ``k``, new directions per update (default: half the rank cap, or ``d`` at
            full rank; plus the missing rank while it is not yet filled); rows beyond ``k`` are
            sketched.
        sketch: ``"gaussian"`` (``Xᵀ Ω``) or ``"rows"`` (``k`` random rows of ``X``).
        max_rows: subsample this many rows (e.g. spatial locations of a conv layer) for the
            Rayleigh–Ritz projection, reweighted to stay unbiased; the trace always uses all rows.
        seed: seed of the sketches.
    """

    rank: int = 24
    energy: float | None = None
    max_rank: int | None = None
    sketch_size: int | None = None
    sketch: str = "gaussian"
    max_rows: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("rank", self.rank)
        if self.energy is not None:
            check_real("energy", self.energy, lambda v: 0.0 < v <= 1.0,
                       "None or a number in (0, 1]")
        check_optional_int("max_rank", self.max_rank)
        check_optional_int("sketch_size", self.sketch_size)
        check_choice("sketch", self.sketch, SKETCHES)
        check_optional_int("max_rows", self.max_rows)
        check_int("seed", self.seed, low=0)

    @property
    def rank_cap(self) -> int:
        """The largest rank a factor may keep: ``max_rank`` (or ``rank``) in energy mode."""
        if self.energy is not None:
            return self.max_rank if self.max_rank is not None else self.rank
        return self.rank


def _rayleigh_ritz(
    B: Tensor, weight: Tensor | float, keep: float, lam: Tensor, sigma: Tensor | float
) -> tuple[Tensor, Tensor]:
    """Eigenpairs of ``M = Zᵀ F_new Z = w (X Z)ᵀ (X Z) + keep · blockdiag(diag(λ), σ I)``,
    descending (eigenvalues clamped at 0), for ``B = X Z`` of shape ``(n, q)`` or ``(b, n, q)``.

    ``weight``, ``sigma``: scalars, or ``(b, 1, 1)`` / ``(b, 1)`` tensors in the batched case;
    ``lam``: ``(r,)`` or ``(b, r)``. Float64; ``eigh`` reads the lower triangle only.
    """
    M = (B.mT @ B).double().mul_(weight)
    if keep > 0:
        diag = M.diagonal(dim1=-2, dim2=-1)
        r = lam.shape[-1]
        diag[..., :r].add_(lam.double(), alpha=keep)
        diag[..., r:].add_(keep * sigma)
    mu, V = small_eigh(M)
    return mu.flip(-1).clamp_min(0.0), V.flip(-1)


class ProjectedFactor(KroneckerFactor):
    """Low-rank-plus-scaled-identity factor refreshed by Rayleigh–Ritz (see the module docstring).

    Args:
        dim: ``d``.
        options: :class:`ProjectedOptions` (or a dict; single options also as keywords).
        **kwargs: ``dtype`` and ``device`` (as :class:`~natgrad.factors.base.KroneckerFactor`)
            and single options by name.
    """

    name = "projected"
    spectral = True
    Options = ProjectedOptions
    state_keys = ("U", "lam", "sigma", "tr")

    def __init__(self, dim: int, options: Any = None, **kwargs: Any) -> None:
        super().__init__(dim, options, **kwargs)
        opts = self.options
        self.rank, self.energy = opts.rank, opts.energy
        self.max_rank = opts.max_rank if opts.max_rank is not None else opts.rank
        self.rank_cap = min(opts.rank_cap, self.dim)
        # full rank keeps every row (exact); otherwise half the rank cap of new directions
        full = self.rank_cap >= self.dim
        self.sketch_size = opts.sketch_size or (self.dim if full else max(1, self.rank_cap // 2))
        self.sketch = opts.sketch
        self.max_rows = opts.max_rows
        self.seed = opts.seed
        self.U = torch.zeros(self.dim, 0, dtype=self.dtype, device=self.device)
        self.lam = torch.zeros(0, dtype=self.dtype, device=self.device)
        self.sigma = 0.0
        self.tr = 0.0
        self._tol = 100.0 * torch.finfo(self.dtype).eps

    @classmethod
    def create(cls, dim: int, options: Any = None, *, dtype: torch.dtype = torch.float32,
               device: Any = None) -> KroneckerFactor:
        """A projected factor, or an exact :class:`EighFactor` when ``dim ≤`` the rank cap."""
        opts = ProjectedOptions.coerce(options)
        if dim <= opts.rank_cap:
            return EighFactor(dim, dtype=dtype, device=device)
        return cls(dim, opts, dtype=dtype, device=device)

    def cost(self) -> float:
        return float(self.dim) * (self.rank_cap + self.sketch_size) ** 2  # linear in d

    # ------------------------------------------------------------------ statistics
    def _sketch_matrix(self, n: int, k: int, gen: torch.Generator) -> Tensor:
        """Gaussian ``Ω`` (``(n, k)``), drawn in float32 whatever the working precision, so that
        float32 and float64 factors with the same seed see the same sketches."""
        omega = torch.randn(n, k, generator=gen, device=self.device, dtype=torch.float32)
        return omega.to(self.dtype)

    def _gaussian_sketch(self, rows: Tensor, k: int, gen: torch.Generator) -> Tensor:
        """``Y = Xᵀ Ω`` (``(d, k)``) for the ``(n, d)`` rows ``X`` (:func:`gaussian_sketch`)."""
        return gaussian_sketch(rows, self._sketch_matrix(rows.shape[0], k, gen))

    def _update(
        self, rows: Tensor, new_weight: float, keep: float, sq_norm: float | None = None
    ) -> bool:
        n = rows.shape[0]
        if sq_norm is None:
            sq_norm = to_floats(squared_norms([rows]))[0]
        new_tr = keep * self.tr + new_weight * sq_norm
        if not math.isfinite(new_tr):  # non-finite rows (everything below is finite otherwise)
            self._skip("non-finite statistics")
            return False
        gen = None
        if self.max_rows is not None and n > self.max_rows:  # unbiased row subsample
            gen = update_generator(self)
            idx = torch.randperm(n, generator=gen, device=self.device)[: self.max_rows]
            new_weight = new_weight * n / self.max_rows
            rows, n = rows[idx], self.max_rows
        U = self.U if keep > 0 else self.U[:, :0]
        # the missing rank plus the usual k (a sketch of only the missing rank would not be
        # oversampled: a one-shot build from a single batch would find a poor subspace)
        k = self.sketch_size + self.rank_cap - U.shape[1]
        if n <= k:
            Y = rows.T
        else:
            gen = gen or update_generator(self)
            if self.sketch == "gaussian":
                Y = self._gaussian_sketch(rows, k, gen)
            else:
                Y = rows[torch.randperm(n, generator=gen, device=self.device)[:k]].T
        Q = orth_complement(Y, U, self._tol)
        Z = torch.cat([U, Q], dim=1)  # (d, r + k')
        B = rows @ Z  # (n, r + k')
        try:
            mu, V = _rayleigh_ritz(B, new_weight, keep, self.lam[: U.shape[1]], self.sigma)
        except RuntimeError as err:  # LinAlgError: keep the previous state
            self._skip(f"eigh failed ({err})")
            return False
        r = self._choose_rank(mu, new_tr)
        self._accept(Z @ V[:, :r].to(self.dtype), mu[:r], new_tr)
        return True

    def _accept(self, U: Tensor, lam: Tensor, tr: float, lam_sum: float | None = None) -> None:
        """Install a refreshed ``(U, λ)`` with the tracked trace; ``σ`` follows from it."""
        # rounding drift is slow: check orthonormality now and then
        self.U = self._polish(U) if self.updates % 8 == 7 else U
        self.lam = lam.to(self.dtype)
        self.tr = tr
        rest = self.dim - lam.numel()
        lam_sum = float(lam.sum()) if lam_sum is None else lam_sum
        self.sigma = max(0.0, (tr - lam_sum) / rest) if rest > 0 else 0.0

    def _skip(self, why: str) -> None:
        warnings.warn(
            f"projected factor (d={self.dim}): {why}; subspace update skipped",
            RuntimeWarning,
            stacklevel=4,
        )

    # ------------------------------------------------------------------ batched statistics
    @classmethod
    def update_batch(cls, items: list[FactorUpdate], decay: float) -> None:
        """:meth:`update` for several factors with one set of batched tensor ops.

        Factors in the steady state — rank filled, fixed rank, Gaussian sketch with ``n > k``,
        no row subsampling — and with equal ``(n, r, k)``, dtype and device are stacked,
        zero-padded to the widest ``d`` (zero rows keep ``U`` orthonormal and do not change any
        product), and refreshed together; this removes the per-factor overhead of the many small
        operations. Every other factor, or a group whose fast orthonormalisation meets a nearly
        dependent sketch, takes :meth:`update` one by one. The sketches come from the same
        per-factor generators, so both paths give the same result up to rounding.
        """
        groups: dict[tuple, list[FactorUpdate]] = {}
        rest: list[FactorUpdate] = []
        for item in items:
            f = item.factor
            key = f._batch_key(item.rows) if isinstance(f, ProjectedFactor) else None
            if key is None:
                rest.append(item)
            else:
                groups.setdefault(key, []).append(item)
        for group in groups.values():
            rest.extend(group if len(group) < 2 else cls._update_group(group, decay))
        for item in rest:
            item.factor.update(item.rows, item.scale, decay, item.sq_norm)

    def _batch_key(self, rows: Tensor) -> tuple | None:
        """Grouping key for :meth:`update_batch`, or ``None`` when this update is not batchable."""
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            return None  # update() raises the error
        n = rows.shape[0]
        steady = (self.updates > 0 and self.energy is None and self.sketch == "gaussian"
                  and self.current_rank == self.rank_cap and n > self.sketch_size
                  and (self.max_rows is None or n <= self.max_rows))
        return (n, self.rank_cap, self.sketch_size, self.dtype, self.device) if steady else None

    @staticmethod
    def _update_group(group: list[FactorUpdate], decay: float) -> list[FactorUpdate]:
        """The batched refresh of :meth:`update_batch`; returns the items it left unchanged for
        :meth:`update` (all of them on a failure; when some sketches are nearly dependent, only
        those, the rest being redone as a smaller batch with the same sketches)."""
        fs: list[ProjectedFactor] = [item.factor for item in group]  # type: ignore[misc]
        f0 = fs[0]
        dtype, device, r, k = f0.dtype, f0.device, f0.rank_cap, f0.sketch_size
        rows = [item.rows.to(device=device, dtype=dtype) for item in group]
        n, b = rows[0].shape[0], len(fs)
        dims = [f.dim for f in fs]
        weights = [(1.0 - decay) * item.scale for item in group]
        batch_tr = [item.sq_norm for item in group]
        missing = [i for i, t in enumerate(batch_tr) if t is None]
        if missing:  # one sync for all the norms the caller did not pass
            for i, t in zip(missing, to_floats(squared_norms([rows[i] for i in missing]))):
                batch_tr[i] = t
        new_tr = [decay * f.tr + w * t for f, w, t in zip(fs, weights, batch_tr)]
        if not all(math.isfinite(t) for t in new_tr):
            return group  # update() warns and skips the offending factor
        # products with the rows are done per factor, straight into a zero-padded basis buffer
        # Z = [U, Y] (b, d, r + k)
        Z = rows[0].new_zeros(b, max(dims), r + k)
        for i, (f, x) in enumerate(zip(fs, rows)):
            Z[i, : f.dim, :r] = f.U
            Z[i, : f.dim, r:] = f._gaussian_sketch(x, k, update_generator(f))
        Q = cholesky_qr2(Z[:, :, r:], Z[:, :, :r], f0._tol)
        if Q is None:  # nearly dependent sketches: update() drops directions one by one
            bad = [cholesky_qr2(Z[i, :, r:], Z[i, :, :r], f0._tol) is None for i in range(b)]
            if not any(bad) or sum(bad) > b - 2:
                return group
            ok = [item for item, x in zip(group, bad) if not x]
            return [item for item, x in zip(group, bad) if x] + ProjectedFactor._update_group(
                ok, decay)
        Z[:, :, r:] = Q
        B = Z.new_empty(b, n, r + k)
        for i, (f, x) in enumerate(zip(fs, rows)):
            torch.mm(x, Z[i, : f.dim], out=B[i])  # (n, r + k)
        f64 = dict(dtype=torch.float64, device=device)
        try:
            mu, V = _rayleigh_ritz(B, torch.tensor(weights, **f64).view(b, 1, 1), decay,
                                   torch.stack([f.lam for f in fs]),
                                   torch.tensor([f.sigma for f in fs], **f64).view(b, 1))
        except RuntimeError:
            return group
        mu = mu[:, :r]
        U_new = torch.bmm(Z, V[:, :, :r].to(dtype))  # (b, d, r)
        lam_sum = mu.sum(1).tolist()  # one sync for the group
        for i, f in enumerate(fs):
            # a leading-rows slice of a contiguous (b, d, r) buffer: contiguous, no copy needed
            f._accept(U_new[i, : f.dim], mu[i], new_tr[i], lam_sum[i])
            f.updates += 1
        return []

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
    def refresh(self, damping: float) -> None:
        """Nothing to decompose: the representation is its own inverse (and finite, since
        :meth:`_update` only accepts finite states); only the damping is recorded."""
        self.damping = float(damping)
        self.refreshed = True

    def eigen(self) -> tuple[Tensor, Tensor, float]:
        return self.U, self.lam, float(self.sigma)

    def inv_matmul(self, v: Tensor) -> Tensor:
        Utv = self.U.T @ v
        out = self.U @ (Utv / (self.lam + self.damping).unsqueeze(-1))
        if self.U.shape[1] < self.dim:
            out = out + (v - self.U @ Utv) / (self.sigma + self.damping)
        return out

    def _state_shape(self, key: str, value: Tensor) -> tuple[int, ...]:
        # the kept rank varies (it grows while filling and follows the energy): U is (d, r) and λ
        # is (r,) for some r <= the rank cap; check_state compares the two below
        r = min(int(value.shape[-1]) if value.ndim else 0, self.rank_cap)
        return (self.dim, r) if key == "U" else (r,)

    def check_state(self, state: Any, partial: bool = False) -> None:
        super().check_state(state, partial)
        if "U" in state and "lam" in state and tuple(state["lam"].shape) != (
                state["U"].shape[1],):
            raise ValueError(f"projected factor state (d={self.dim}): U has "
                             f"{state['U'].shape[1]} columns but lam has shape "
                             f"{tuple(state['lam'].shape)}")

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

    def state_summary(self) -> str:
        """``"rank now k"`` once updated, if the rank is chosen from the energy or not yet full."""
        if self.updates == 0 or (self.energy is None and self.current_rank == self.rank_cap):
            return ""
        return f"rank now {self.current_rank}"

    def describe(self) -> str:
        if self.energy is not None:
            return f"projected(d={self.dim}, energy={self.energy:g}, r<={self.rank_cap})"
        return f"projected(d={self.dim}, r={self.rank_cap})"
