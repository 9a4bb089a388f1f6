"""The one curvature object: block-diagonal, one curvature block per preconditioned layer.

:class:`KroneckerCurvature` owns the layer discovery (:mod:`.registration`), the blocks and their
factors, the update (all layers' factor updates in one batched call per strategy), the refresh
schedule bookkeeping, the damped solves and the checkpoint state. The optimizer
(:class:`natgrad.KFAC`), the analysis (:class:`natgrad.fisher.KFACOperator`) and the distributed
coordinator all work through it; statistics reach it from one of the two captures
(:mod:`.hooks` inside training steps, :mod:`.data` from a data set).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..blocks import CurvatureBlock, LayerStatistics
from ..factors import (
    FACTOR_DTYPES,
    Direction,
    FactorOptions,
    KroneckerFactor,
    get_strategy,
    update_factors,
)
from ..layers import LayerHelper
from ..norms import squared_norms, to_floats
from .damping import damping_floor
from .registration import Registration, discover


def factor_dtype_for(weight: Tensor, factor_dtype: torch.dtype | None) -> torch.dtype:
    """The factors' precision: ``factor_dtype``, else the weight's promoted to at least float32
    (half-precision weights get float32 factors)."""
    if factor_dtype is not None:
        return factor_dtype
    return torch.promote_types(weight.dtype, torch.float32)


def check_factor_dtype(factor_dtype: Any) -> torch.dtype | None:
    """``ValueError`` unless ``factor_dtype`` is ``None``, ``torch.float32`` or
    ``torch.float64``."""
    if factor_dtype is not None and factor_dtype not in FACTOR_DTYPES:
        raise ValueError(
            f"invalid factor_dtype={factor_dtype!r}: expected None, torch.float32 or "
            "torch.float64 (half precision cannot hold the factors; with bfloat16/float16 "
            "weights the default is float32)"
        )
    return factor_dtype


class KroneckerCurvature:
    """Block-diagonal curvature of ``model`` with one :class:`~natgrad.blocks.CurvatureBlock`
    per preconditioned layer.

    Args:
        model: the network (already unwrapped from DDP).
        params: the optimised parameters (default: all of the model's); layers with parameters
            outside them are not preconditioned.
        strategy: factor strategy name (:data:`natgrad.factors.STRATEGIES`).
        options: the strategy's options (its ``Options`` dataclass or a dict).
        factor_dtype: precision of the factors (default: each weight's, at least float32).
        registration: a precomputed :class:`Registration` (default: :func:`discover`).
    """

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Tensor] | None = None,
        *,
        strategy: str = "eigh",
        options: FactorOptions | dict[str, Any] | None = None,
        factor_dtype: torch.dtype | None = None,
        registration: Registration | None = None,
    ) -> None:
        cls = get_strategy(strategy)
        self.options = cls.Options.coerce(options)
        self.factor_dtype = check_factor_dtype(factor_dtype)
        self.model = model
        self.strategy = strategy
        param_list = list(model.parameters()) if params is None else list(params)
        self._optimised = {id(p) for p in param_list}
        self.registration = registration or discover(model, param_list)
        self.blocks: dict[str, CurvatureBlock] = {}
        for name, helper in self.registration.layers.items():
            w = helper.module.weight
            self.blocks[name] = helper.make_block(
                strategy, self.options, factor_dtype_for(w, factor_dtype), w.device)
        #: curvature updates applied per layer (identical on every rank: the schedule reads it)
        self.updates = {name: 0 for name in self.blocks}
        #: per layer, the damping floor of its last refresh (:mod:`.damping`)
        self.damping_floors: dict[str, float] = {}
        self._floor_warned = False
        #: layers taken out at run time (:meth:`drop_layer`) → why; kept in checkpoints
        self.dropped: dict[str, str] = {}

    # ------------------------------------------------------------------ layers
    @property
    def layers(self) -> dict[str, LayerHelper]:
        """Preconditioned layers: name → helper."""
        return self.registration.layers

    @property
    def factors(self) -> dict[str, tuple[KroneckerFactor, ...]]:
        """Name → the block's factors (``(A, G)`` for Kronecker blocks)."""
        return {name: block.factors for name, block in self.blocks.items()}

    def drop_layer(self, name: str, reason: str) -> None:
        """Stop preconditioning a layer (e.g. its forward never runs through the module)."""
        self.registration.skip(name, reason, self.model, self._optimised)
        del self.blocks[name]
        del self.updates[name]
        self.dropped[name] = reason

    # ------------------------------------------------------------------ statistics
    def update(self, stats: dict[str, LayerStatistics], decay: float,
               skip: Iterable[str] = ()) -> list[str]:
        """Fold one step's statistics into the blocks: every layer's factor updates in one
        batched call per strategy.

        Args:
            stats: per layer (layers without statistics are left as they are).
            decay: the EMA decay ``ρ``.
            skip: layers whose update is counted but not applied here (a distributed owner
                applies it and broadcasts the state).

        Returns:
            the layers whose statistics were non-finite; their blocks are untouched (one sync
            for all statistics).
        """
        names = [n for n in stats if n in self.blocks]
        if not names:
            return []
        sq = to_floats(squared_norms([t for n in names for t in (stats[n].a, stats[n].g)]))
        bad, items, skip = [], [], set(skip)
        for name, a_sq, g_sq in zip(names, sq[0::2], sq[1::2]):
            st = stats[name]
            st.a_sq, st.g_sq = a_sq, g_sq
            if not (math.isfinite(a_sq) and math.isfinite(g_sq)):
                bad.append(name)
                continue
            self.updates[name] += 1
            if name not in skip:
                items.extend(self.blocks[name].stage(st, decay))
        update_factors(items, decay)
        return bad

    def due(self, name: str, step: int, inverse_every: int) -> bool:
        """Whether layer ``name`` refreshes at ``step``: it has curvature, and its inverse is not
        usable yet or ``step`` is a multiple of ``inverse_every``."""
        if self.updates[name] == 0:
            return False
        return not self.blocks[name].refreshed or step % inverse_every == 0

    def refresh(self, name: str, damping: float) -> None:
        """Refresh layer ``name`` for damping ``λ`` (raises
        :class:`~natgrad.factors.FactorRefreshError`, previous inverse kept).

        ``λ`` below the layer's damping floor (:mod:`.damping`: ``√eps · λ_max`` of its factors'
        precision) is raised to it, with one warning per curvature object; the floor of the
        refresh is kept in :attr:`damping_floors` and applied by :meth:`solve` too (a spectral
        refresh does not use ``λ``: the warning comes with the first solve that does, so a
        user of the eigenbases alone, e.g. ``eigen_adam``, is not told about a damping it
        does not use)."""
        block = self.blocks[name]
        if all(f.spectral or getattr(f, "diagonal", False) for f in block.factors):
            block.refresh(damping)  # a spectral refresh does not depend on λ; the solve does
            floor = damping_floor(block)
        else:  # π-split strategies bake λ into the inverse
            floor = damping_floor(block)
            block.refresh(self._floored(name, damping, floor))
        self.damping_floors[name] = floor  # (a failed refresh keeps the previous one)

    def forget_floor(self, name: str) -> None:
        """Drop layer ``name``'s cached damping floor (its state was replaced, e.g. received from
        its owner): the next :meth:`solve` recomputes it from the state it has."""
        self.damping_floors.pop(name, None)

    def _floored(self, name: str, damping: float, floor: float) -> float:
        if damping >= floor:
            return damping
        if not self._floor_warned:
            self._floor_warned = True
            dtype = str(self.blocks[name].factors[0].dtype).replace("torch.", "")
            warnings.warn(
                f"natgrad: damping {damping:.3g} is below what the {dtype} factors of layer "
                f"{name!r} resolve; using {floor:.3g} (sqrt(eps) x the block's largest "
                "eigenvalue, the damping floor) — other layers likewise, see "
                "curvature.damping_floors (warned once)", RuntimeWarning, stacklevel=4)
        return floor

    def solve(self, name: str, blocks: list[Tensor], damping: float,
              norm2: Tensor | None = None) -> Direction:
        """The damped natural-gradient direction of layer ``name`` (``λ`` at least the layer's
        damping floor, :meth:`refresh`)."""
        return self.blocks[name].solve(blocks, self._solve_damping(name, damping), norm2)

    def _solve_damping(self, name: str, damping: float) -> float:
        floor = self.damping_floors.get(name)
        if floor is None:
            floor = self.damping_floors[name] = damping_floor(self.blocks[name])
        return self._floored(name, damping, floor)

    def solve_many(self, requests: dict[str, tuple[list[Tensor], float, Tensor | None]]
                   ) -> dict[str, Direction]:
        """:meth:`solve` for several layers (``name → (blocks, λ, ‖V‖²)``), in their order;
        blocks of one type go to its :meth:`~natgrad.blocks.CurvatureBlock.solve_many` together
        (equal-shaped Kronecker blocks are solved in one batched product)."""
        by_type: dict[type, list[str]] = {}
        for name in requests:
            by_type.setdefault(type(self.blocks[name]), []).append(name)
        out: dict[str, Direction] = {}
        for kind, names in by_type.items():
            items = [(self.blocks[n], requests[n][0], self._solve_damping(n, requests[n][1]),
                      requests[n][2]) for n in names]
            out.update(zip(names, kind.solve_many(items)))
        return {name: out[name] for name in requests}

    # ------------------------------------------------------------------ reporting
    def summary_lines(self) -> list[str]:
        """One line per preconditioned layer, per skipped layer and for the plain parameters."""
        lines = []
        for name, h in self.layers.items():
            lines.append(f"  preconditioned  {name or '<model>'} [{h.kind}] "
                         f"{self.blocks[name].summary()}")
            if h.note:
                lines.append(f"    {h.note}")
            elif h.pending:
                lines.append(f"    to be checked on its first forward ({h.pending})")
        uses = self.registration.shared_uses
        lines += [f"  shared use      {name} ({reason})" if name in uses else
                  f"  plain step      {name} ({reason})"
                  for name, reason in self.registration.skipped.items()]
        lines += [f"  shared          {p}: {how}" for p, how in self.registration.shared.items()]
        if self.registration.plain:
            lines.append("  parameters with the plain (momentum) step: "
                         + ", ".join(self.registration.plain))
            lines += [f"    {p}: {why}" for p, why in self.registration.plain.items()]
        return lines

    def memory_usage(self) -> dict[str, int]:
        """Bytes of curvature state per layer."""
        return {n: b.state_bytes() for n, b in self.blocks.items()}

    def describe(self) -> list[str]:
        """Static per-layer labels (for fingerprints that must agree across ranks)."""
        return [f"{name}:{b.describe()}" for name, b in self.blocks.items()]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        for name in self.blocks:  # every layer's floor, from the state saved with it
            if name not in self.damping_floors:
                self.damping_floors[name] = damping_floor(self.blocks[name])
        return {
            "strategy": self.strategy,
            "updates": dict(self.updates),
            "dropped": dict(self.dropped),
            "factors": {n: tuple(f.state_dict() for f in b.factors)
                        for n, b in self.blocks.items()},
            "damping_floors": dict(self.damping_floors),
        }

    def check_state(self, state: Any) -> None:
        """``ValueError`` saying what is wrong when ``state`` (a :meth:`state_dict`) does not fit
        this curvature: other layers, another strategy, a factor of the wrong shape; changes
        nothing."""
        if not isinstance(state, dict) or "factors" not in state:
            raise ValueError("state_dict has no natgrad curvature state ('factors')")
        dropped = self._dropped_in(state)
        factors = state["factors"]
        expected = set(self.blocks) - set(dropped)
        if not isinstance(factors, dict) or set(factors) != expected:
            have = sorted(factors) if isinstance(factors, dict) else factors
            raise ValueError(f"state_dict holds factors for layers {have}, this optimizer has "
                             f"{sorted(expected)}")
        for name, parts in factors.items():
            block = self.blocks[name]
            if not isinstance(parts, (tuple, list)) or len(parts) != len(block.factors):
                raise ValueError(f"state_dict factor of layer {name!r}: expected "
                                 f"{len(block.factors)} factor states")
            for f, s in zip(block.factors, parts):
                if not isinstance(s, dict) or s.get("strategy") != f.name or s.get("dim") != f.dim:
                    got = (s.get("strategy"), s.get("dim")) if isinstance(s, dict) else s
                    raise ValueError(f"state_dict factor of layer {name!r} is {got!r}; expected "
                                     f"{f.name!r} (d={f.dim})")
                try:
                    f.check_state(s)
                except ValueError as err:
                    raise ValueError(f"state_dict factor of layer {name!r}: {err}") from None
        updates = state.get("updates")
        if updates is not None and (not isinstance(updates, dict)
                                    or set(updates) != expected):
            raise ValueError("state_dict 'updates' does not list the same layers")
        floors = state.get("damping_floors")
        if floors is not None and (not isinstance(floors, dict) or not set(floors) <= set(
                self.blocks) or not all(isinstance(v, float) and math.isfinite(v) and v >= 0
                                        for v in floors.values())):
            raise ValueError("state_dict 'damping_floors' must map this optimizer's layers to "
                             "finite floats >= 0")

    def _dropped_in(self, state: dict[str, Any]) -> dict[str, str]:
        """The layers of this curvature the checkpoint's run took out (``dropped``: name →
        reason; ``ValueError`` if malformed)."""
        dropped = state.get("dropped", {})
        if not isinstance(dropped, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in dropped.items()):
            raise ValueError("state_dict 'dropped' must map layer names to reasons")
        return {n: r for n, r in dropped.items() if n in self.blocks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` (validated completely first). Layers the checkpoint's run
        took out (refused or called functionally) are taken out here too, with their reason."""
        self.check_state(state)
        for name, reason in self._dropped_in(state).items():
            self.drop_layer(name, reason)
        for name, parts in state["factors"].items():
            for f, s in zip(self.blocks[name].factors, parts):
                f.load_state_dict(s)
        updates = state.get("updates")
        self.updates = ({n: int(v) for n, v in updates.items()} if updates is not None else
                        {n: min(f.updates for f in b.factors) for n, b in self.blocks.items()})
        # (a state without floors: recomputed from the loaded factors at the next solve)
        self.damping_floors = dict(state.get("damping_floors") or {})
