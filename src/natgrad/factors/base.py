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

A strategy is one subclass, registered with :func:`natgrad.factors.register_strategy`. It owns
everything that depends on it: its options type (:attr:`KroneckerFactor.Options`), its cost
estimate (:meth:`KroneckerFactor.cost`, used to spread work over ranks), its state tensors for
checkpoints and broadcasts (:attr:`KroneckerFactor.state_keys`, :meth:`state_dict`,
:meth:`check_state`), and how it refreshes its inverse (:meth:`refresh`). Strategies that
decompose a dense matrix share :class:`DecomposedFactor` (retry in float64, keep the previous
inverse on failure).
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from ..norms import all_finite
from .options import FactorOptions

#: the floating dtypes factors may be stored in (half precision is refused: see KroneckerFactor)
FACTOR_DTYPES = (torch.float32, torch.float64)


class FactorRefreshError(RuntimeError):
    """A decomposition failed in the working precision and in float64; the previous one is kept."""


class KroneckerFactor(ABC):
    """Base class of every factor strategy.

    Args:
        dim: ``d``, the factor is ``d × d``.
        options: the strategy's :attr:`Options` (an instance, a dict, or ``None`` for the
            defaults); single options may also be given as keyword arguments.
        dtype: storage and compute precision, ``torch.float32`` or ``torch.float64`` (half
            precision cannot hold second moments or run the decompositions reliably).
        device: where the state lives.
    """

    name: ClassVar[str]
    spectral: ClassVar[bool] = False
    #: the factor is exactly diagonal (:meth:`diag` gives it); solved in closed form
    diagonal: ClassVar[bool] = False
    #: the strategy's options type (one frozen dataclass, validated on construction)
    Options: ClassVar[type[FactorOptions]] = FactorOptions
    #: attributes (tensors, floats or ints) that make up the state; saved by :meth:`state_dict`
    state_keys: ClassVar[tuple[str, ...]] = ()
    #: the part of the state that any holder of the same statistics computes itself (e.g. the
    #: dense EMA ``F``); a distributed owner need not broadcast it when every rank updates
    statistics_keys: ClassVar[tuple[str, ...]] = ()
    #: whether :meth:`update_moment` is available (the strategy stores the dense ``F``)
    supports_moment: ClassVar[bool] = False

    def __init__(
        self,
        dim: int,
        options: FactorOptions | dict[str, Any] | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        **option_kwargs: Any,
    ) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if dtype not in FACTOR_DTYPES:
            raise ValueError(f"invalid factor dtype {dtype!r}: expected torch.float32 or "
                             "torch.float64")
        self.options = self.Options.coerce(options, **option_kwargs)
        self.dim = int(dim)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.updates = 0
        self.damping = 0.0
        self.refreshed = False

    @classmethod
    def create(
        cls,
        dim: int,
        options: FactorOptions | dict[str, Any] | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> KroneckerFactor:
        """Construct a factor; a strategy may return another one (e.g. too narrow to project)."""
        return cls(dim, options, dtype=dtype, device=device)

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
        self._ema(functools.partial(self._update, sq_norm=sq_norm), rows, scale, decay)

    @classmethod
    def update_batch(cls, items: list[FactorUpdate], decay: float) -> None:
        """:meth:`update` for several factors of this strategy; a strategy may override it to do
        the work in batched tensor ops."""
        for item in items:
            item.factor.update(item.rows, item.scale, decay, item.sq_norm)

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
        raise TypeError(f"the {self.name!r} strategy cannot be updated from a dense moment")

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
    @abstractmethod
    def refresh(self, damping: float) -> None:
        """Make :meth:`inv_matmul` apply ``(F + damping·I)⁻¹`` (spectral strategies: make
        :meth:`eigen` reflect the current ``F``). On failure raise :class:`FactorRefreshError`
        and keep the previous state; set :attr:`refreshed` once usable."""

    @classmethod
    def refresh_batch(cls, factors: list[KroneckerFactor], dampings: list[float]) -> None:
        """:meth:`refresh` for several factors (e.g. the groups of a grouped convolution), in
        order, stopping at the first :class:`FactorRefreshError`; a strategy may override it to
        decompose equal-sized factors in one batched call with the same result."""
        for f, damping in zip(factors, dampings, strict=True):
            f.refresh(damping)

    @abstractmethod
    def inv_matmul(self, v: Tensor) -> Tensor:
        """``(F + δ I)⁻¹ v`` for ``v`` of shape ``(d, k)``, ``δ`` as of the last :meth:`refresh`."""

    def eigen(self) -> tuple[Tensor, Tensor, float]:
        """``(U, λ, σ)`` with ``F ≈ U diag(λ) Uᵀ + σ (I − U Uᵀ)``; ``U`` is ``(d, r)``.

        Only spectral strategies implement it; it reflects the last :meth:`refresh`.
        """
        raise NotImplementedError(f"the {self.name!r} strategy is not spectral")

    # ------------------------------------------------------------------ cost
    @abstractmethod
    def cost(self) -> float:
        """Relative cost (a flop count, not seconds) of one update plus refresh of this factor,
        used to spread the per-layer work over ranks (:mod:`natgrad.distributed.assignment`)."""

    # ------------------------------------------------------------------ inspection
    @abstractmethod
    def to_dense(self) -> Tensor:
        """The represented ``F`` as a dense ``(d, d)`` matrix (for tests and small analyses)."""

    def dense_diagonal(self) -> Tensor:
        """``diag F`` as represented, ``(d,)`` (a strategy may give it without :meth:`to_dense`)."""
        return self.to_dense().diagonal()

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

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Strategy, size, counters and every :attr:`state_keys` entry (tensors cloned)."""
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

    def check_state(self, state: Any, partial: bool = False) -> None:
        """``ValueError`` saying what is wrong when ``state`` cannot be loaded into this factor
        (another strategy or size, a missing key unless ``partial``, a tensor of the wrong shape or
        kind); changes nothing."""
        if not isinstance(state, dict):
            raise ValueError(f"factor state must be a dict, got {type(state).__name__}")
        if state.get("strategy") != self.name or state.get("dim") != self.dim:
            raise ValueError(
                f"factor state is for strategy={state.get('strategy')!r}, dim={state.get('dim')}; "
                f"this factor is strategy={self.name!r}, dim={self.dim}"
            )
        missing = [k for k in ("updates", "damping", "refreshed", *self.state_keys)
                   if k not in state]
        if missing and not partial:
            raise ValueError(f"{self.name} factor state (d={self.dim}) lacks {missing}")
        for key in self.state_keys:
            if key not in state:
                continue
            value, current = state[key], getattr(self, key, None)
            if isinstance(current, Tensor):
                if not isinstance(value, Tensor) or not value.is_floating_point():
                    raise ValueError(f"{self.name} factor state {key!r} must be a floating "
                                     f"tensor, got {type(value).__name__}")
                expected = self._state_shape(key, value)
                if tuple(value.shape) != expected:
                    raise ValueError(f"{self.name} factor state {key!r} (d={self.dim}) has shape "
                                     f"{tuple(value.shape)}, expected {expected}")
            elif isinstance(value, Tensor):
                raise ValueError(f"{self.name} factor state {key!r} must be a number, got a "
                                 "tensor")

    def _state_shape(self, key: str, value: Tensor) -> tuple[int, ...]:
        """The shape the checkpointed ``key`` must have (default: that of the current state)."""
        return tuple(getattr(self, key).shape)

    def load_state_dict(self, state: dict[str, Any], partial: bool = False) -> None:
        """Load a :meth:`state_dict` (validated first by :meth:`check_state`); with ``partial``,
        entries missing from ``state`` keep their current value (a distributed owner sends only
        what the other ranks cannot compute themselves)."""
        self.check_state(state, partial)
        for key in ("updates", "damping", "refreshed"):
            if key in state:
                setattr(self, key, {"updates": int, "damping": float,
                                    "refreshed": bool}[key](state[key]))
        for key in self.state_keys:
            if key not in state:
                continue
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


class DecomposedFactor(KroneckerFactor):
    """Strategies whose :meth:`refresh` decomposes a matrix: the decomposition is computed in the
    working precision, then in float64 if that fails, and only a finite result replaces the
    current inverse (:class:`FactorRefreshError` otherwise)."""

    def refresh(self, damping: float) -> None:
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


class DenseFactor(DecomposedFactor):
    """Shared storage for strategies that keep the dense ``(d, d)`` EMA ``F``."""

    supports_moment = True
    statistics_keys = ("F",)

    def __init__(self, dim: int, options: Any = None, **kwargs: Any) -> None:
        super().__init__(dim, options, **kwargs)
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
