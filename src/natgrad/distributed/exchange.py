"""Owners broadcast what changed in their layers' curvature, through the factors' public state.

For each layer in ``names`` its owner describes every factor with :meth:`KroneckerFactor.
state_dict` (minus the ``statistics_keys`` every rank computed itself, when all ranks updated) —
scalars and shapes go in one ``all_gather_object``, the tensors in one flat buffer per (owner,
dtype), broadcast asynchronously — and the other ranks load the result with
``load_state_dict(..., partial=True)``, which validates it like a checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..curvature import KroneckerCurvature
from .env import collective, wait_all

#: counters every factor state carries besides its state keys
SCALARS = ("updates", "damping", "refreshed")


def global_rank(group_rank: int, group: Any) -> int:
    """The global rank of ``group_rank`` in ``group``."""
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def exchange(
    curvature: KroneckerCurvature,
    names: list[str],
    owner: dict[str, int],
    rank: int,
    group: Any,
    *,
    send_tensors: bool,
    skip_statistics: dict[str, bool],
    errors: dict[str, str | None],
) -> dict[str, dict[str, Any]]:
    """Owners describe (and with ``send_tensors`` broadcast the state of) the layers ``names``.

    Args:
        skip_statistics: per layer, whether every rank computed the factors' ``statistics_keys``
            itself (then they are not sent).
        errors: per layer, the owner's refresh failure message (or ``None``).

    Returns:
        layer → ``{"factors": [per factor {SCALARS..., "state": {key: spec}}], "error": ...}``.
    """
    world = dist.get_world_size(group)
    local: dict[str, dict[str, Any]] = {}
    payload: list[Tensor] = []
    for name in names:
        if owner[name] != rank:
            continue
        entry: dict[str, Any] = {"factors": [], "error": errors.get(name)}
        for factor in curvature.blocks[name].factors:
            sd = factor.state_dict()
            desc: dict[str, Any] = {k: sd[k] for k in SCALARS}
            specs: dict[str, Any] = {}
            if send_tensors:
                skip = factor.statistics_keys if skip_statistics[name] else ()
                for key in factor.state_keys:
                    if key in skip:
                        continue
                    value = sd[key]
                    if isinstance(value, Tensor):
                        specs[key] = (tuple(value.shape), str(value.dtype).replace("torch.", ""))
                        payload.append(value.reshape(-1))
                    else:
                        specs[key] = ("value", value)
            desc["state"] = specs
            entry["factors"].append(desc)
        local[name] = entry
    gathered: list[Any] = [None] * world
    with collective("all_gather_object (factor metadata)", group):
        dist.all_gather_object(gathered, local, group=group)
    metas: dict[str, dict[str, Any]] = {}
    for per_rank in gathered:
        metas.update(per_rank)
    received = _broadcast(curvature, names, metas, owner, rank, group, payload) \
        if send_tensors else {}
    for name in names:
        if owner[name] == rank:
            continue
        for side, (factor, desc) in enumerate(zip(curvature.blocks[name].factors,
                                                  metas[name]["factors"])):
            state: dict[str, Any] = {"strategy": factor.name, "dim": factor.dim}
            state.update({k: desc[k] for k in SCALARS})
            for key, spec in desc["state"].items():
                state[key] = spec[1] if spec[0] == "value" else received[(name, side)][key]
            factor.load_state_dict(state, partial=True)
    return {n: metas[n] for n in names}


def _broadcast(
    curvature: KroneckerCurvature,
    names: list[str],
    metas: dict[str, dict[str, Any]],
    owner: dict[str, int],
    rank: int,
    group: Any,
    payload: list[Tensor],
) -> dict[tuple[str, int], dict[str, Tensor]]:
    """One flat buffer per (owner, dtype), broadcast asynchronously; returns the received
    tensors per (layer, factor index)."""
    # the layout of each owner's buffer follows ``names`` order: the same on all ranks
    layout: dict[tuple[int, str], list[tuple[str, int, str, tuple[int, ...]]]] = {}
    for name in names:
        for side, desc in enumerate(metas[name]["factors"]):
            for key, spec in desc["state"].items():
                if spec[0] != "value":
                    layout.setdefault((owner[name], spec[1]), []).append(
                        (name, side, key, spec[0]))
    mine: dict[str, list[Tensor]] = {dtype: [] for (o, dtype) in layout if o == rank}
    it = iter(payload)
    for name in names:  # re-split the owner's payload by dtype, in the same order
        if owner[name] != rank:
            continue
        for desc in metas[name]["factors"]:
            for spec in desc["state"].values():
                if spec[0] != "value":
                    mine[spec[1]].append(next(it))
    device = next((f.device for b in curvature.blocks.values() for f in b.factors),
                  torch.device("cpu"))
    buffers: dict[tuple[int, str], Tensor] = {}
    works = []
    with collective("broadcast (factor state)", group):
        for (src, dtype), entries in layout.items():
            if src == rank:
                buf = torch.cat(mine[dtype]) if mine[dtype] else torch.empty(0)
            else:
                numel = sum(_numel(shape) for *_, shape in entries)
                buf = torch.empty(numel, dtype=getattr(torch, dtype), device=device)
            buffers[(src, dtype)] = buf
            works.append(dist.broadcast(buf, src=global_rank(src, group), group=group,
                                        async_op=True))
    wait_all(works, "broadcast (factor state)", group)
    received: dict[tuple[str, int], dict[str, Tensor]] = {}
    for (src, dtype), entries in layout.items():
        if src == rank:
            continue
        buf, off = buffers[(src, dtype)], 0
        for name, side, key, shape in entries:
            n = _numel(shape)
            received.setdefault((name, side), {})[key] = buf[off:off + n].view(shape)
            off += n
    return received
