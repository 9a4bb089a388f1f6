"""Data-parallel natural gradient on ``torch.distributed`` (see docs/DISTRIBUTED.md).

* :mod:`.env` — ``init_from_env()``, ``is_main()``, ``rank()``, ``world_size()``, ``shard(batch)``:
  rank helpers that are no-ops in a single process;
* :mod:`.statistics` — combining per-rank curvature statistics into the global batch's;
* :mod:`.assignment` — greedy LPT assignment of per-layer work to ranks (costs from the blocks);
* :mod:`.exchange` — owners broadcast factor state through the factors' public state interface;
* :mod:`.signature` — the model/curvature fingerprint compared across ranks;
* :mod:`.kfac` — :class:`DistributedKFAC`, what ``natgrad.KFAC(distributed=...)`` calls.

``natgrad.KFAC`` picks :class:`DistributedKFAC` by itself when a process group with more than one
rank is initialised; pass ``distributed=DistributedKFAC(...)`` to choose the options.
"""

from .assignment import assign_lpt, factor_cost
from .env import (
    DistInfo,
    DistributedError,
    all_reduce_sum,
    broadcast_object,
    init_from_env,
    is_initialized,
    is_main,
    rank,
    shard,
    shard_bounds,
    shutdown,
    world_size,
)
from .kfac import BROADCAST_MODES, DistributedKFAC, SingleProcess, resolve
from .signature import check_same_model, model_signature
from .statistics import STAT_MODES, GlobalStatistics, reduce_statistics, update_factor

__all__ = [
    "BROADCAST_MODES",
    "STAT_MODES",
    "DistInfo",
    "DistributedError",
    "DistributedKFAC",
    "GlobalStatistics",
    "SingleProcess",
    "all_reduce_sum",
    "assign_lpt",
    "broadcast_object",
    "check_same_model",
    "factor_cost",
    "init_from_env",
    "is_initialized",
    "is_main",
    "model_signature",
    "rank",
    "reduce_statistics",
    "resolve",
    "shard",
    "shard_bounds",
    "shutdown",
    "update_factor",
    "world_size",
]
