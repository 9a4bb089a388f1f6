"""One interface for a Kronecker factor ``F`` (``A`` or ``G``) of a layer's Fisher block.

A factor is an exponential moving average of batch second moments,

    ``F ← ρ F + (1 − ρ) · scale · Xᵀ X``        (the first update sets ``F = scale · Xᵀ X``),

where ``X`` is ``(n, d)``: one row per sample (and location). Strategies differ in how they store
``F`` and how they apply the damped inverse ``(F + δ I)⁻¹``:

* *spectral* strategies (``eigh``, ``projected``) expose ``F ≈ U diag(λ) Uᵀ + σ (I − U Uᵀ)``
  through :meth:`KroneckerFactor.eigen`, which lets a layer apply exact Tikhonov damping to the
  Kronecker product (``(A ⊗ G + λ I)⁻¹``, see :mod:`natgrad.factors.kronecker`);
* the others (``cholesky``, ``recursive``) provide ``(F + δ I)⁻¹`` for the ``δ`` given to
  :meth:`KroneckerFactor.refresh`, used with the π-split of the damping.

The optimizer and the analysis only talk to this interface; adding a strategy is one module and
one entry in :data:`natgrad.factors.STRATEGIES`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from functools import partial
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from ..norms import all_finite


class FactorRefreshError(RuntimeError):
    """A decomposition failed in the working precision and in float64; the previous one is kept."""


class KroneckerFactor(ABC):
    """Base class of every factor strategy.

    Args:
        dim: ``d``, the factor is ``d × d``.
        dtype: storage and compute precision.
        device: where the state lives.
    """

    name: ClassVar[str]
    spectral: ClassVar[bool] = False
    #: attributes (tensors, floats or ints) that make up the state; saved by :meth:`state_dict`
    state_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim}")
        self.dim = int(dim)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.updates = 0
        self.damping = 0.0
        self.refreshed = False

    @classmethod
    def create(cls, dim: int, **options: Any) -> KroneckerFactor:
        """Construct a factor; a strategy may return another one (e.g. too narrow to project)."""
        return cls(dim, **options)

    # ------------------------------------------------------------------ statistics
    def update(
        self, rows: Tensor, scale: float, decay: float, sq_norm: float | None = None
    ) -> None:
        """EMA update with the batch statistics ``scale · rowsᵀ rows``.

        Args:
            rows: ``(n, d)``.
            scale: weight of ``rowsᵀ rows`` in the batch estimate (e.g. ``1/m``).
            decay: ``ρ ∈ [0, 1)``; ignored on the first update.
            sq_norm: ``‖rows‖_F²`` when the caller already has it (a strategy that tracks the
                trace uses it instead of another pass over ``rows``).
        """
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"rows must have shape (n, {self.dim}), got {tuple(rows.shape)}")
        rows = rows.to(device=self.device, dtype=self.dtype)
        self._ema(partial(self._update, sq_norm=sq_norm), rows, scale, decay)

    @classmethod
    def update_batch(cls, items: list[FactorUpdate], decay: float) -> None:
        """:meth:`update` for several factors of this strategy; a strategy may override it to do
        the work in batched tensor ops."""
        for item in items:
            item.factor.update(item.rows, item.scale, decay, item.sq_norm)

    #: whether :meth:`update_moment` is available (the strategy stores the dense ``F``)
    supports_moment: ClassVar[bool] = False

    def update_moment(self, moment: Tensor, scale: float, decay: float) -> None:
        """The same EMA update from a dense second moment ``S = Xᵀ X`` (``d × d``) instead of rows
        (e.g. statistics all-reduced across ranks). Only for :attr:`supports_moment` strategies."""
        if not self.supports_moment:
            raise TypeError(f"the {self.name!r} strategy cannot be updated from a dense moment")
        if moment.shape != (self.dim, self.dim):
            raise ValueError(
                f"moment must have shape ({self.dim}, {self.dim}), got {tuple(moment.shape)}"
            )
        S = moment.to(device=self.device, dtype=self.dtype)
        self._ema(self._update_moment, S, scale, decay)

    def _ema(self, apply, stats: Tensor, scale: float, decay: float) -> None:
        """``apply(stats, new_weight, keep)`` with the first-update rule, then count it (unless
        ``apply`` returns ``False``: an update the strategy skipped, state untouched)."""
        if self.updates == 0:
            done = apply(stats, new_weight=scale, keep=0.0)
        else:
            done = apply(stats, new_weight=(1.0 - decay) * scale, keep=decay)
        if done is not False:
            self.updates += 1

    def _update_moment(self, S: Tensor, new_weight: float, keep: float) -> None:
        """``F ← keep · F + new_weight · S`` (strategies with :attr:`supports_moment`)."""
        raise NotImplementedError

    @abstractmethod
    def _update(
        self, rows: Tensor, new_weight: float, keep: float, sq_norm: float | None = None
    ) -> bool | None:
        """``F ← keep · F + new_weight · rowsᵀ rows`` (``keep = 0``: replace); ``False`` if the
        strategy skipped the update and left its state untouched. ``sq_norm``: ``‖rows‖_F²`` if
        known."""

    @abstractmethod
    def trace(self) -> float:
        """``tr F`` (exact, also for compressed representations)."""

    # ------------------------------------------------------------------ inverse
    def refresh(self, damping: float) -> None:
        """Recompute the inverse representation for ``(F + damping·I)``.

        Tries the working precision, then float64. Only a finite result replaces the current
        state; otherwise :class:`FactorRefreshError` is raised and the previous state stays.
        """
        last: Exception | None = None
        for dtype in (self.dtype, torch.float64) if self.dtype != torch.float64 else (self.dtype,):
            try:
                new = self._compute_inverse(damping, dtype)
            except (RuntimeError, ValueError) as err:  # LinAlgError is a RuntimeError
                last = err
                continue
            if all_finite([v for v in new.values() if isinstance(v, Tensor)]):
                for key, value in new.items():
                    if isinstance(value, Tensor):
                        value = value.to(self.dtype)
                    setattr(self, key, value)
                self.damping = float(damping)
                self.refreshed = True
                return
            last = FloatingPointError("non-finite result")
        raise FactorRefreshError(f"{self.name} factor (d={self.dim}) refresh failed: {last}")

    @abstractmethod
    def _compute_inverse(self, damping: float, dtype: torch.dtype) -> dict[str, Any]:
        """New values of the inverse-related attributes, computed in ``dtype``; no side effects."""

    @abstractmethod
    def inv_matmul(self, v: Tensor) -> Tensor:
        """``(F + δ I)⁻¹ v`` for ``v`` of shape ``(d, k)``, ``δ`` as of the last :meth:`refresh`."""

    def eigen(self) -> tuple[Tensor, Tensor, float]:
        """``(U, λ, σ)`` with ``F ≈ U diag(λ) Uᵀ + σ (I − U Uᵀ)``; ``U`` is ``(d, r)``.

        Only spectral strategies implement it; it reflects the last :meth:`refresh`.
        """
        raise NotImplementedError(f"the {self.name!r} strategy is not spectral")

    # ------------------------------------------------------------------ inspection
    @abstractmethod
    def to_dense(self) -> Tensor:
        """The represented ``F`` as a dense ``(d, d)`` matrix (for tests and small analyses)."""

    def eigenvalues(self) -> Tensor:
        """All ``d`` eigenvalues of the represented ``F``, descending."""
        return torch.linalg.eigvalsh(self.to_dense().double()).flip(0).to(self.dtype)

    def state_bytes(self) -> int:
        """Bytes held by the factor's state (statistics and inverse representation)."""
        return sum(
            v.numel() * v.element_size()
            for v in (getattr(self, k, None) for k in self.state_keys)
            if isinstance(v, Tensor)
        )

    def state_dict(self) -> dict[str, Any]:
        sd: dict[str, Any] = {
            "strategy": self.name,
            "dim": self.dim,
            "updates": self.updates,
            "damping": self.damping,
            "refreshed": self.refreshed,
        }
        for key in self.state_keys:
            value = getattr(self, key, None)
            sd[key] = value.clone() if isinstance(value, Tensor) else value
        return sd

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("strategy") != self.name or state.get("dim") != self.dim:
            raise ValueError(
                f"factor state is for strategy={state.get('strategy')!r}, dim={state.get('dim')}; "
                f"this factor is strategy={self.name!r}, dim={self.dim}"
            )
        self.updates = int(state["updates"])
        self.damping = float(state["damping"])
        self.refreshed = bool(state["refreshed"])
        for key in self.state_keys:
            value = state[key]
            if isinstance(value, Tensor):
                value = value.to(device=self.device, dtype=self.dtype).clone()
            setattr(self, key, value)

    def describe(self) -> str:
        """A short label for summaries, e.g. ``eigh(d=785)``."""
        return f"{self.name}(d={self.dim})"

    def state_summary(self) -> str:
        """What changed at run time and is worth reporting beside :meth:`describe` (e.g. a rank
        chosen from the data), or ``""``. Unlike :meth:`describe` it may differ between steps."""
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, updates={self.updates})"


class FactorUpdate(NamedTuple):
    """One pending :meth:`KroneckerFactor.update`: ``scale · rowsᵀ rows`` for ``factor``."""

    factor: KroneckerFactor
    rows: Tensor
    scale: float
    sq_norm: float | None = None  # ‖rows‖_F², if known


def update_factors(items: list[tuple], decay: float) -> None:
    """Apply several factor updates, grouped by strategy (see :meth:`KroneckerFactor.update_batch`).

    Args:
        items: :class:`FactorUpdate` or plain ``(factor, rows, scale[, sq_norm])`` tuples.

    The result is that of calling :meth:`KroneckerFactor.update` on each item in turn, up to
    floating-point rounding."""
    groups: dict[type, list[FactorUpdate]] = {}
    for item in items:
        item = FactorUpdate(*item)
        groups.setdefault(type(item.factor), []).append(item)
    for cls, group in groups.items():
        cls.update_batch(group, decay)


class DenseFactor(KroneckerFactor):
    """Shared storage for strategies that keep the dense ``(d, d)`` EMA ``F``."""

    supports_moment = True

    def __init__(self, dim: int, **options: Any) -> None:
        super().__init__(dim, **options)
        self.F = torch.zeros(self.dim, self.dim, dtype=self.dtype, device=self.device)

    def _update(
        self, rows: Tensor, new_weight: float, keep: float, sq_norm: float | None = None
    ) -> None:
        # F ← keep·F + w·XᵀX, symmetric by construction
        self.F = torch.addmm(self.F, rows.T, rows, beta=keep, alpha=new_weight)

    def _update_moment(self, S: Tensor, new_weight: float, keep: float) -> None:
        self.F = torch.add(self.F * keep, S, alpha=new_weight)

    def trace(self) -> float:
        return float(self.F.diagonal().sum())

    def to_dense(self) -> Tensor:
        return self.F
