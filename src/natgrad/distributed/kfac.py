"""Data-parallel K-FAC: what :class:`natgrad.KFAC` calls to work across ``torch.distributed`` ranks.

The optimizer talks to one coordinator (``KFAC(..., distributed=...)``), which works on the
optimizer's :class:`~natgrad.curvature.KroneckerCurvature` at five points of a step:

1. :meth:`~DistributedKFAC.reduce_statistics` after the capture: the rows of every rank are
   combined into the statistics of the concatenated global batch (:mod:`.statistics`);
2. :meth:`~DistributedKFAC.update`: the same batched curvature update as in one process
   (:meth:`KroneckerCurvature.update`); dense factors are updated on every rank (cheap, and they
   stay identical), row-based strategies whose update *is* the expensive part (``projected``,
   ``recursive``) only on the layer's owner;
3. :meth:`~DistributedKFAC.refresh`: only the owner of a layer refreshes its inverse; owners are
   chosen once by greedy LPT on the blocks' own cost estimates (:mod:`.assignment`);
4. :meth:`~DistributedKFAC.synchronize`: owners broadcast what changed, through the factors'
   public state (:mod:`.exchange`: the inverse state, and the statistics only when the owner
   alone updated them); refresh failures are reported on every rank;
5. :meth:`~DistributedKFAC.solve`: with ``broadcast="gradient"`` the inverse state never leaves
   its owner; the owner preconditions the layer's gradient and broadcasts the result every step
   instead (less memory, more traffic per step; call :meth:`sync_state` before a checkpoint).

:class:`SingleProcess` implements the same calls as plain local operations and is the default
when no process group is initialised.

After each step the optimizer state (factors, counters, momentum) is identical on every rank in
``broadcast="inverse"`` mode, so a checkpoint written by rank 0 resumes on any world size. The
private generator of the Monte-Carlo labels is the one exception: rank ``r > 0`` reseeds it with
a rank-dependent seed so the ranks draw independent labels.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..curvature import KroneckerCurvature, LayerStatistics
from ..factors import Direction, FactorRefreshError
from .assignment import assign_lpt
from .env import collective, is_initialized
from .exchange import exchange, global_rank
from .signature import check_same_model, model_signature
from .statistics import STAT_MODES, GlobalStatistics, reduce_statistics

logger = logging.getLogger("natgrad")

BROADCAST_MODES = ("inverse", "gradient")


class SingleProcess:
    """The no-op coordinator: every call is the local single-process operation."""

    active = False
    rank = 0
    world_size = 1

    def __init__(self) -> None:
        self.curvature: KroneckerCurvature | None = None

    def setup(self, curvature: KroneckerCurvature, generator: torch.Generator | None = None,
              fisher: str = "") -> None:
        """Remember the curvature (nothing to check or assign)."""
        self.curvature = curvature

    def reduce_statistics(self, stats: dict[str, LayerStatistics], active: bool
                          ) -> dict[str, LayerStatistics]:
        return stats

    def update(self, stats: dict[str, LayerStatistics], decay: float) -> list[str]:
        """The batched curvature update; returns the layers with non-finite statistics."""
        assert self.curvature is not None, "setup() was not called"
        return self.curvature.update(stats, decay)

    def refresh(self, name: str, damping: float) -> None:
        assert self.curvature is not None
        self.curvature.refresh(name, damping)

    def synchronize(self) -> list[tuple[str, FactorRefreshError]]:
        return []

    def solve(self, name: str, blocks: list[Tensor], damping: float,
              norm2: Tensor | None = None) -> Direction:
        assert self.curvature is not None
        return self.curvature.solve(name, blocks, damping, norm2)

    def solve_many(self, requests: dict[str, tuple[list[Tensor], float, Tensor | None]]
                   ) -> dict[str, Direction]:
        """:meth:`solve` for several layers (``name → (blocks, λ, ‖V‖²)``), batched where the
        curvature can (:meth:`KroneckerCurvature.solve_many`)."""
        assert self.curvature is not None
        return self.curvature.solve_many(requests)

    def agree(self, value: float) -> float:
        """A float every rank must use alike (here: ``value`` itself)."""
        return value

    def after_load(self, generator: torch.Generator | None = None) -> None:
        """Nothing to do."""

    def sync_state(self) -> None:
        """Nothing to do."""


class DistributedKFAC(SingleProcess):
    """Coordinates :class:`natgrad.KFAC` across the ranks of a process group.

    Args:
        group: the process group (default: the world).
        statistics: ``"auto"``, ``"gather"`` (all-gather rows) or ``"reduce"`` (all-reduce dense
            moments; dense strategies only) — see :mod:`natgrad.distributed.statistics`.
        broadcast: ``"inverse"`` (owners broadcast the factors' inverse state after a refresh;
            default) or ``"gradient"`` (owners broadcast the preconditioned gradients every step).
        owner_update: update a factor only on its owner and broadcast its state (``None``: for
            strategies that cannot use a dense moment, i.e. ``projected`` and ``recursive``).
        check_model: compare a model signature across ranks in :meth:`setup`.
    """

    active = True

    def __init__(
        self,
        group: Any = None,
        *,
        statistics: str = "auto",
        broadcast: str = "inverse",
        owner_update: bool | None = None,
        check_model: bool = True,
    ) -> None:
        super().__init__()
        if statistics not in STAT_MODES:
            raise ValueError(f"invalid statistics={statistics!r}; accepted: {STAT_MODES}")
        if broadcast not in BROADCAST_MODES:
            raise ValueError(f"invalid broadcast={broadcast!r}; accepted: {BROADCAST_MODES}")
        if not is_initialized():
            raise RuntimeError(
                "natgrad.distributed.DistributedKFAC needs an initialised process group "
                "(torch.distributed.init_process_group or natgrad.distributed.init_from_env)"
            )
        self.group = group
        self.statistics = statistics
        self.broadcast = broadcast
        self.owner_update_option = owner_update
        self.check_model = check_model
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.owner: dict[str, int] = {}
        self.owner_updates: dict[str, bool] = {}
        self.costs: dict[str, float] = {}
        self._pending: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ set-up
    def setup(self, curvature: KroneckerCurvature, generator: torch.Generator | None = None,
              fisher: str = "") -> None:
        """Check that every rank runs the same model/curvature, then assign layers to ranks."""
        self.curvature = curvature
        if self.check_model:
            check_same_model(curvature, fisher, self.group)
        self.costs = {n: b.cost() for n, b in curvature.blocks.items()}
        self.owner = assign_lpt(list(self.costs.items()), self.world_size)
        for name, block in curvature.blocks.items():
            dense = all(f.supports_moment for f in block.factors)
            opt = self.owner_update_option
            self.owner_updates[name] = (not dense) if opt is None else bool(opt)
        if self.rank > 0 and generator is not None:  # independent Monte-Carlo labels per rank
            generator.manual_seed(_rank_seed(generator.initial_seed(), self.rank))
        logger.info("natgrad.distributed: rank %d/%d owns %s", self.rank, self.world_size,
                    [n for n, r in self.owner.items() if r == self.rank])

    def after_load(self, generator: torch.Generator | None = None) -> None:
        """Re-derive a rank-specific MC generator after a checkpoint (saved by one rank) loads."""
        if self.rank > 0 and generator is not None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            generator.manual_seed(_rank_seed(seed, self.rank))

    # ------------------------------------------------------------------ statistics
    def reduce_statistics(self, stats: dict[str, LayerStatistics], active: bool
                          ) -> dict[str, LayerStatistics]:
        """Global-batch statistics (collective on curvature steps, identity otherwise)."""
        if not active:
            return stats
        assert self.curvature is not None, "setup() was not called"
        return reduce_statistics(stats, self.curvature.layers, self.curvature.factors,
                                 mode=self.statistics, group=self.group)

    def update(self, stats: dict[str, LayerStatistics], decay: float) -> list[str]:
        """The single-process batched update on every rank, except that a layer updated by its
        owner only is counted but skipped elsewhere (its state follows by broadcast)."""
        assert self.curvature is not None
        others = {n for n in stats if self.owner_updates.get(n) and self.owner[n] != self.rank}
        bad = self.curvature.update(stats, decay, skip=others)
        for name in stats:
            if self.owner_updates.get(name) and name not in bad:
                self._pending.setdefault(name, {})["updated"] = True
        return bad

    # ------------------------------------------------------------------ refresh
    def refresh(self, name: str, damping: float) -> None:
        """Refresh on the owner only; failures are reported by :meth:`synchronize` on all ranks."""
        assert self.curvature is not None
        entry = self._pending.setdefault(name, {})
        entry["refresh"] = True
        if self.owner[name] != self.rank:
            return
        try:
            self.curvature.refresh(name, damping)
        except FactorRefreshError as err:
            entry["error"] = str(err)

    def synchronize(self) -> list[tuple[str, FactorRefreshError]]:
        """Broadcast what the owners changed this step; returns the refresh failures (all ranks).

        Every rank takes the same decisions (which layers were updated / refreshed), so when
        nothing is pending no communication happens.
        """
        assert self.curvature is not None
        pending, self._pending = self._pending, {}
        names = [n for n in self.curvature.blocks if n in pending]
        if not names:
            return []
        errors = {n: pending[n].get("error") for n in names}
        if self.broadcast == "gradient":
            names = [n for n in names if pending[n].get("refresh")]
            if not names:
                return []
        metas = self._exchange(names, send_tensors=self.broadcast != "gradient", errors=errors)
        for n in names:  # the owners' states arrived: floors are recomputed from them
            self.curvature.forget_floor(n)
        return [(n, FactorRefreshError(m["error"])) for n, m in metas.items() if m.get("error")]

    def sync_state(self) -> None:
        """Broadcast every layer's full state from its owner (collective).

        Needed only with ``broadcast="gradient"`` (where non-owners keep stale inverses) before
        ``state_dict()`` is saved; a no-op otherwise.
        """
        assert self.curvature is not None
        if self.broadcast == "gradient":
            self._exchange(list(self.curvature.blocks), send_tensors=True, errors={})
            for n in self.curvature.blocks:  # recomputed from the same state on every rank
                self.curvature.forget_floor(n)

    def _exchange(self, names: list[str], send_tensors: bool, errors: dict[str, str | None]
                  ) -> dict[str, dict[str, Any]]:
        assert self.curvature is not None
        skip = {n: not self.owner_updates[n] for n in names}
        return exchange(self.curvature, names, self.owner, self.rank, self.group,
                        send_tensors=send_tensors, skip_statistics=skip, errors=errors)

    # ------------------------------------------------------------------ preconditioning
    def agree(self, value: float) -> float:
        """Rank 0's ``value`` on every rank (collective). The KL-clip's quadratic is summed from
        each rank's local solves, which can differ in the last bit; the clip factor, and the
        relative clip's running mean, must not."""
        t = torch.tensor([value], dtype=torch.float64)
        with collective("broadcast (KL-clip quadratic)", self.group):
            dist.broadcast(t, src=global_rank(0, self.group), group=self.group)
        return float(t.item())

    def solve(self, name: str, blocks: list[Tensor], damping: float,
              norm2: Tensor | None = None) -> Direction:
        """Local solve (``"inverse"``), or the owner's solve broadcast to all (``"gradient"``)."""
        assert self.curvature is not None
        if self.broadcast == "inverse":
            return self.curvature.solve(name, blocks, damping, norm2)
        owner = self.owner[name]
        if owner == self.rank:
            D = self.curvature.solve(name, blocks, damping).dense().contiguous()
        else:
            width = sum(b.shape[1] for b in blocks)
            D = blocks[0].new_empty(blocks[0].shape[0], width)
        with collective(f"broadcast (preconditioned gradient of {name!r})", self.group):
            dist.broadcast(D, src=global_rank(owner, self.group), group=self.group)
        return Direction.from_dense(blocks, D)

    def solve_many(self, requests: dict[str, tuple[list[Tensor], float, Tensor | None]]
                   ) -> dict[str, Direction]:
        """Batched local solves (``"inverse"``), or each owner's solve broadcast in turn."""
        if self.broadcast == "inverse":
            return super().solve_many(requests)
        return {name: self.solve(name, *req) for name, req in requests.items()}


def _rank_seed(seed: int, rank: int) -> int:
    digest = hashlib.sha256(f"natgrad-mc:{seed}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def resolve(distributed: Any) -> SingleProcess:
    """The coordinator for ``KFAC(distributed=...)``.

    ``None`` (default): :class:`DistributedKFAC` when a process group with more than one rank is
    initialised, else :class:`SingleProcess`; ``False``: always :class:`SingleProcess`; ``True``:
    :class:`DistributedKFAC` (error without a process group); a coordinator object: itself.
    Anything else raises ``ValueError`` (checked before the optimizer changes anything).
    """
    if distributed is None:
        if is_initialized() and dist.get_world_size() > 1:
            return DistributedKFAC()
        return SingleProcess()
    if distributed is False:
        return SingleProcess()
    if distributed is True:
        return DistributedKFAC()
    if isinstance(distributed, SingleProcess):
        return distributed
    raise ValueError(
        "invalid distributed: expected None, True, False or a natgrad.distributed coordinator "
        f"(DistributedKFAC), got {type(distributed).__name__}"
    )


__all__ = [
    "BROADCAST_MODES",
    "DistributedKFAC",
    "GlobalStatistics",
    "SingleProcess",
    "check_same_model",
    "model_signature",
    "resolve",
]
