"""Data-parallel K-FAC: what :class:`natgrad.KFAC` calls to work across ``torch.distributed`` ranks.

The optimizer talks to one object (``KFAC(..., distributed=...)``) at five points of a step:

1. :meth:`~DistributedKFAC.reduce_statistics` after the capture: the rows of every rank are
   combined into the statistics of the concatenated global batch (:mod:`.statistics`);
2. :meth:`~DistributedKFAC.update_all` (layer by layer, :meth:`~DistributedKFAC.update`): dense
   factors are updated on every rank (cheap, and they stay identical); row-based strategies whose
   update *is* the expensive part (``projected``, ``recursive``) are updated only by the layer's
   owner;
3. :meth:`~DistributedKFAC.refresh_pair`: only the owner of a layer recomputes its inverse
   representation; owners are chosen once by greedy LPT on the estimated cost
   (:mod:`.assignment`);
4. :meth:`~DistributedKFAC.synchronize`: owners broadcast what changed — the inverse state of
   the factor (``state_dict`` tensors: ``Q, λ`` for eigh, ``P`` for cholesky, the low-rank
   ``U, λ, σ`` … for projected; the dense statistics ``F`` only when the owner alone updated it),
   bucketed per owner and sent asynchronously; refresh failures are reported on every rank;
5. :meth:`~DistributedKFAC.precondition`: with ``broadcast="gradient"`` the inverse state never
   leaves its owner; the owner preconditions the layer's gradient and broadcasts the result
   every step instead (less memory, more traffic per step; call :meth:`sync_state` before a
   checkpoint).

:class:`SingleProcess` implements the same calls as plain local operations and is the default
when no process group is initialised, so the single-process path does exactly what it did before.

After each step the optimizer state (factors, counters, momentum) is identical on every rank in
``broadcast="inverse"`` mode, so a checkpoint written by rank 0 resumes on any world size. The
private generator of the Monte-Carlo labels is the one exception: rank ``r > 0`` reseeds it with
a rank-dependent seed so the ranks draw independent labels.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..factors import Direction, FactorRefreshError, KroneckerFactor, solve, update_factors
from ..factors import refresh_pair as _refresh_pair
from .assignment import assign_lpt, factor_cost
from .env import collective, is_initialized, wait_all
from .statistics import (
    STAT_MODES,
    GlobalStatistics,
    reduce_statistics,
    update_factor,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..capture import Statistics
    from ..optim.kfac import KFAC

logger = logging.getLogger("natgrad")

BROADCAST_MODES = ("inverse", "gradient")
_SCALARS = ("updates", "damping", "refreshed")
_DENSE_STATISTICS = ("F",)  # state keys every rank computes itself when all ranks update


class SingleProcess:
    """The no-op coordinator: every call is the local single-process operation."""

    active = False
    rank = 0
    world_size = 1

    def setup(self, kfac: KFAC) -> None:
        """Nothing to check or assign."""

    def reduce_statistics(self, stats: dict[str, Statistics], active: bool) -> dict[str, Any]:
        return stats

    def update_all(self, items: list[tuple[str, KroneckerFactor, KroneckerFactor, Statistics]],
                   decay: float) -> None:
        """:meth:`update` for several layers at once (strategies may batch the work)."""
        update_factors(
            [u for _, A, G, st in items
             for u in ((A, st.a, st.a_scale, st.a_sq), (G, st.g, st.g_scale, st.g_sq))],
            decay,
        )

    def refresh_pair(self, name: str, A: KroneckerFactor, G: KroneckerFactor,
                     damping: float) -> None:
        _refresh_pair(A, G, damping)

    def synchronize(self) -> list[tuple[str, FactorRefreshError]]:
        return []

    def precondition(self, name: str, blocks: list[Tensor], A: KroneckerFactor,
                     G: KroneckerFactor, damping: float, norm2: Tensor | None = None) -> Direction:
        return solve(blocks, A, G, damping, norm2)

    def after_load(self, kfac: KFAC) -> None:
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
        self._kfac: KFAC | None = None
        self._pending: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ set-up
    def setup(self, kfac: KFAC) -> None:
        """Check that every rank runs the same model/optimizer, then assign layers to ranks."""
        self._kfac = kfac
        if self.check_model:
            check_same_model(kfac, self.group)
        self.costs = {n: factor_cost(A) + factor_cost(G) for n, (A, G) in kfac.factors.items()}
        self.owner = assign_lpt(list(self.costs.items()), self.world_size)
        for name, (A, G) in kfac.factors.items():
            dense = A.supports_moment and G.supports_moment
            opt = self.owner_update_option
            self.owner_updates[name] = (not dense) if opt is None else bool(opt)
        if self.rank > 0:  # independent Monte-Carlo labels per rank
            gen = kfac._generator
            gen.manual_seed(_rank_seed(gen.initial_seed(), self.rank))
        logger.info("natgrad.distributed: rank %d/%d owns %s", self.rank, self.world_size,
                    [n for n, r in self.owner.items() if r == self.rank])

    def after_load(self, kfac: KFAC) -> None:
        """Re-derive a rank-specific MC generator after a checkpoint (saved by one rank) loads."""
        if self.rank > 0:
            gen = kfac._generator
            seed = int(torch.randint(0, 2**62, (1,), generator=gen))
            gen.manual_seed(_rank_seed(seed, self.rank))

    # ------------------------------------------------------------------ statistics
    def reduce_statistics(self, stats: dict[str, Statistics], active: bool) -> dict[str, Any]:
        """Global-batch statistics (collective on curvature steps, identity otherwise)."""
        if not active:
            return stats
        assert self._kfac is not None, "setup() was not called"
        return reduce_statistics(stats, self._kfac.layers, self._kfac.factors,
                                 mode=self.statistics, group=self.group)

    def update_all(self, items: list[tuple[str, KroneckerFactor, KroneckerFactor, Statistics]],
                   decay: float) -> None:
        for name, A, G, st in items:
            self.update(name, A, G, st, decay)

    def update(self, name: str, A: KroneckerFactor, G: KroneckerFactor, st: Statistics,
               decay: float) -> None:
        """Apply the global statistics (every rank, or only the owner for row-based strategies)."""
        a_mom = bool(getattr(st, "a_moment", False))
        g_mom = bool(getattr(st, "g_moment", False))
        if self.owner_updates[name]:
            self._pending.setdefault(name, {})["updated"] = True
            if self.owner[name] != self.rank:
                A.updates += 1  # keeps the refresh schedule identical; state follows by broadcast
                G.updates += 1
                return
        update_factor(A, st.a, st.a_scale, decay, a_mom)
        update_factor(G, st.g, st.g_scale, decay, g_mom)

    # ------------------------------------------------------------------ refresh
    def refresh_pair(self, name: str, A: KroneckerFactor, G: KroneckerFactor,
                     damping: float) -> None:
        """Refresh on the owner only; failures are reported by :meth:`synchronize` on all ranks."""
        entry = self._pending.setdefault(name, {})
        entry["refresh"] = True
        if self.owner[name] != self.rank:
            return
        try:
            _refresh_pair(A, G, damping)
        except FactorRefreshError as err:
            entry["error"] = str(err)

    def synchronize(self) -> list[tuple[str, FactorRefreshError]]:
        """Broadcast what the owners changed this step; returns the refresh failures (all ranks).

        Every rank takes the same decisions (which layers were updated / refreshed), so when
        nothing is pending no communication happens.
        """
        assert self._kfac is not None
        pending, self._pending = self._pending, {}
        names = [n for n in self._kfac.factors if n in pending]
        if not names:
            return []
        errors = {n: pending[n].get("error") for n in names}
        if self.broadcast == "gradient":
            names = [n for n in names if pending[n].get("refresh")]
            if not names:
                return []
            metas = self._exchange(names, send_tensors=False, errors=errors)
        else:
            metas = self._exchange(names, send_tensors=True, errors=errors)
        return [(n, FactorRefreshError(m["error"])) for n, m in metas.items() if m.get("error")]

    def sync_state(self) -> None:
        """Broadcast every layer's full state from its owner (collective).

        Needed only with ``broadcast="gradient"`` (where non-owners keep stale inverses) before
        ``state_dict()`` is saved; a no-op otherwise.
        """
        assert self._kfac is not None
        if self.broadcast == "gradient":
            self._exchange(list(self._kfac.factors), send_tensors=True, errors={})

    def _keys_to_send(self, name: str, factor: KroneckerFactor) -> list[str]:
        skip = () if self.owner_updates[name] else _DENSE_STATISTICS
        return [k for k in factor.state_keys if k not in skip]

    def _exchange(
        self, names: list[str], send_tensors: bool, errors: dict[str, str | None]
    ) -> dict[str, dict[str, Any]]:
        """Owners describe (and optionally broadcast the tensors of) the layers ``names``."""
        kfac = self._kfac
        assert kfac is not None
        local: dict[str, dict[str, Any]] = {}
        payload: list[Tensor] = []
        for name in names:
            if self.owner[name] != self.rank:
                continue
            entry = self._describe(name, send_tensors, payload)
            entry["error"] = errors.get(name)
            local[name] = entry
        gathered: list[Any] = [None] * self.world_size
        with collective("all_gather_object (factor metadata)", self.group):
            dist.all_gather_object(gathered, local, group=self.group)
        metas: dict[str, dict[str, Any]] = {}
        for per_rank in gathered:
            metas.update(per_rank)
        if send_tensors:
            self._broadcast_payload(names, metas, payload)
        else:
            for name in names:
                for factor, m in zip(kfac.factors[name], metas[name]["factors"]):
                    if self.owner[name] != self.rank:
                        factor.refreshed = m["refreshed"]
                        factor.damping = m["damping"]
        return {n: metas[n] for n in names}

    def _describe(self, name: str, send_tensors: bool, payload: list[Tensor]) -> dict[str, Any]:
        kfac = self._kfac
        assert kfac is not None
        out: dict[str, Any] = {"factors": []}
        for factor in kfac.factors[name]:
            desc: dict[str, Any] = {k: getattr(factor, k) for k in _SCALARS}
            values: dict[str, Any] = {}
            if send_tensors:
                for key in self._keys_to_send(name, factor):
                    value = getattr(factor, key, None)
                    if isinstance(value, Tensor):
                        values[key] = (tuple(value.shape), str(value.dtype).replace("torch.", ""))
                        payload.append(value.detach().reshape(-1))
                    else:
                        values[key] = ("value", value)
            desc["state"] = values
            out["factors"].append(desc)
        return out

    def _broadcast_payload(
        self, names: list[str], metas: dict[str, dict[str, Any]], payload: list[Tensor]
    ) -> None:
        """One flat buffer per (owner, dtype), broadcast asynchronously, then loaded."""
        kfac = self._kfac
        assert kfac is not None
        # the layout of each owner's buffer follows ``names`` order: the same on all ranks
        layout: dict[tuple[int, str], list[tuple[str, int, str, tuple[int, ...]]]] = {}
        for name in names:
            owner = self.owner[name]
            for side, desc in enumerate(metas[name]["factors"]):
                for key, spec in desc["state"].items():
                    if spec[0] == "value":
                        continue
                    shape, dtype = spec
                    layout.setdefault((owner, dtype), []).append((name, side, key, shape))
        mine = {dtype: [] for (o, dtype) in layout if o == self.rank}
        it = iter(payload)
        for name in names:  # re-split the owner's payload by dtype, in the same order
            if self.owner[name] != self.rank:
                continue
            for desc in metas[name]["factors"]:
                for spec in desc["state"].values():
                    if spec[0] != "value":
                        mine[spec[1]].append(next(it))
        buffers: dict[tuple[int, str], Tensor] = {}
        works = []
        with collective("broadcast (factor state)", self.group):
            for (owner, dtype), entries in layout.items():
                if owner == self.rank:
                    buf = torch.cat(mine[dtype]) if mine[dtype] else torch.empty(0)
                else:
                    numel = sum(_numel(s) for *_, s in entries)
                    buf = torch.empty(numel, dtype=getattr(torch, dtype),
                                      device=_device_of(kfac))
                buffers[(owner, dtype)] = buf
                works.append(dist.broadcast(buf, src=_global_rank(owner, self.group),
                                            group=self.group, async_op=True))
        wait_all(works, "broadcast (factor state)", self.group)
        received: dict[tuple[str, int], dict[str, Tensor]] = {}
        for (owner, _), entries in layout.items():
            if owner == self.rank:
                continue
            buf, off = buffers[(owner, _)], 0
            for name, side, key, shape in entries:
                n = _numel(shape)
                received.setdefault((name, side), {})[key] = buf[off : off + n].view(shape)
                off += n
        for name in names:
            if self.owner[name] == self.rank:
                continue
            for side, (factor, desc) in enumerate(zip(kfac.factors[name], metas[name]["factors"])):
                sd: dict[str, Any] = {"strategy": factor.name, "dim": factor.dim}
                sd.update({k: desc[k] for k in _SCALARS})
                for key in factor.state_keys:
                    spec = desc["state"].get(key)
                    if spec is None:  # not sent: this rank's own copy is current
                        sd[key] = getattr(factor, key)
                    elif spec[0] == "value":
                        sd[key] = spec[1]
                    else:
                        sd[key] = received[(name, side)][key]
                factor.load_state_dict(sd)

    # ------------------------------------------------------------------ preconditioning
    def precondition(self, name: str, blocks: list[Tensor], A: KroneckerFactor,
                     G: KroneckerFactor, damping: float, norm2: Tensor | None = None) -> Direction:
        """Local solve (``"inverse"``), or the owner's solve broadcast to all (``"gradient"``)."""
        if self.broadcast == "inverse":
            return solve(blocks, A, G, damping, norm2)
        owner = self.owner[name]
        if owner == self.rank:
            D = solve(blocks, A, G, damping).dense().contiguous()
        else:
            width = sum(b.shape[1] for b in blocks)
            D = blocks[0].new_empty(blocks[0].shape[0], width)
        with collective(f"broadcast (preconditioned gradient of {name!r})", self.group):
            dist.broadcast(D, src=_global_rank(owner, self.group), group=self.group)
        return Direction.from_dense(blocks, D)


# ---------------------------------------------------------------------- helpers
def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _device_of(kfac: KFAC) -> torch.device:
    for A, _ in kfac.factors.values():
        return A.device
    return torch.device("cpu")


def _global_rank(group_rank: int, group: Any) -> int:
    if group is None:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def _rank_seed(seed: int, rank: int) -> int:
    digest = hashlib.sha256(f"natgrad-mc:{seed}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def model_signature(kfac: KFAC) -> tuple[int, int, int, int]:
    """``(hash, parameter count, tensor count, preconditioned layers)`` of model and optimizer.

    The hash covers parameter names, shapes and dtypes, the preconditioned layers with their
    factor sizes, the strategy and its options: everything that must agree across ranks for the
    collectives to line up.
    """
    from ..optim.kfac import unwrap

    net = unwrap(kfac.model)
    h = hashlib.sha256()
    n_params = n_tensors = 0
    for pname, p in net.named_parameters():
        h.update(f"{pname}:{tuple(p.shape)}:{p.dtype};".encode())
        n_params += p.numel()
        n_tensors += 1
    for lname, (A, G) in kfac.factors.items():
        h.update(f"{lname}:{A.describe()}:{G.describe()};".encode())
    h.update(f"{kfac.strategy}:{sorted(kfac.factor_options.items())!r}:{kfac.fisher}".encode())
    digest = int.from_bytes(h.digest()[:8], "little") & (2**63 - 1)
    return digest, n_params, n_tensors, len(kfac.factors)


def check_same_model(kfac: KFAC, group: Any = None) -> None:
    """Raise ``ValueError`` on every rank when the ranks' model/optimizer signatures differ."""
    sig = torch.tensor(model_signature(kfac), dtype=torch.int64)
    world = dist.get_world_size(group)
    sigs = [torch.empty_like(sig) for _ in range(world)]
    with collective("all_gather (model signature check)", group):
        dist.all_gather(sigs, sig, group=group)
    if all(torch.equal(s, sigs[0]) for s in sigs):
        return
    lines = [
        f"  rank {r}: {int(s[1]):,} parameters in {int(s[2])} tensors, {int(s[3])} preconditioned "
        f"layers, signature {int(s[0]):016x}"
        for r, s in enumerate(sigs)
    ]
    raise ValueError(
        "natgrad.KFAC: the model or the K-FAC configuration differs across ranks (parameter "
        "names/shapes/dtypes, preconditioned layers, factor strategy or options):\n"
        + "\n".join(lines)
    )


def resolve(distributed: Any) -> SingleProcess:
    """The coordinator for ``KFAC(distributed=...)``.

    ``None`` (default): :class:`DistributedKFAC` when a process group with more than one rank is
    initialised, else :class:`SingleProcess`; ``False``: always :class:`SingleProcess`; ``True``:
    :class:`DistributedKFAC` (error without a process group); a coordinator object: itself.
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
