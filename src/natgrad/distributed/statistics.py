"""Combining per-rank curvature statistics into the statistics of the global batch.

Each rank's capture yields, per layer, rows ``X_r`` (``n_r × d``) with ``Â_r = X_rᵀX_r / m_r``.
The global batch (the ranks' shards concatenated in rank order) has
``Â = Σ_r X_rᵀX_r / Σ_r m_r``, so the scale is recomputed from the *global* sample count with the
layer helper's own scale rule (``1/m`` for ``A``, ``1/(m·T)`` for conv ``G``).

Two ways to communicate, chosen per factor and step:

* ``"gather"``: all-gather the rows (padded to the largest ``n_r``); every rank then holds the
  exact row matrix of the global batch, as row-based strategies (projected, recursive) need.
  Volume received per rank ``≈ (W−1)/W · N · d`` with ``N = Σ n_r``.
* ``"reduce"``: all-reduce the upper triangle of the dense moment ``Σ_r X_rᵀX_r``; only for
  strategies that keep a dense EMA (:class:`~natgrad.factors.DenseFactor`). Ring all-reduce moves
  ``≈ 2 (W−1)/W · d(d+1)/2`` per rank.

``"auto"`` takes ``reduce`` for dense factors when ``N > d + 1`` (then it moves less) and
``gather`` otherwise. All tensors of one kind go in one bucket per dtype and the all-reduce and the
all-gather run concurrently (``async_op=True``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..curvature import LayerStatistics
from ..factors import KroneckerFactor
from ..layers import LayerHelper
from .env import collective, wait_all

STAT_MODES = ("auto", "gather", "reduce")

#: statistics of the global batch: :class:`~natgrad.curvature.LayerStatistics` whose ``a_moment``
#: (``g_moment``) flag says that ``a`` (``g``) holds the dense moment ``Σ_r X_rᵀX_r`` instead of
#: rows
GlobalStatistics = LayerStatistics


def update_factor(
    factor: KroneckerFactor, data: Tensor, scale: float, decay: float, moment: bool
) -> None:
    """``factor.update`` from rows, or :meth:`KroneckerFactor.update_moment` from ``S = XᵀX``."""
    if moment:
        factor.update_moment(data, scale, decay)
    else:
        factor.update(data, scale, decay)


def _triu_pack(S: Tensor) -> Tensor:
    i, j = torch.triu_indices(S.shape[0], S.shape[0], device=S.device)
    return S[i, j]


def _triu_unpack(v: Tensor, d: int) -> Tensor:
    i, j = torch.triu_indices(d, d, device=v.device)
    S = v.new_zeros(d, d)
    S[i, j] = v
    S[j, i] = v
    return S


def choose_mode(mode: str, factor: KroneckerFactor, total_rows: int) -> str:
    """``"gather"`` or ``"reduce"`` for one factor this step (see the module docstring)."""
    if mode == "gather" or not factor.supports_moment:
        return "gather"
    if mode == "reduce":
        return "reduce"
    return "reduce" if total_rows > factor.dim + 1 else "gather"


def reduce_statistics(
    stats: dict[str, LayerStatistics],
    layers: dict[str, LayerHelper],
    factors: dict[str, tuple[KroneckerFactor, ...]],
    *,
    mode: str = "auto",
    group: Any = None,
) -> dict[str, GlobalStatistics]:
    """The statistics of the global batch, identical on every rank (a collective call).

    Args:
        stats: this rank's :meth:`HookCapture.collect` output (layers may be missing).
        layers: every preconditioned layer, in the same order on every rank.
        factors: the layers' ``(A, G)`` factors (for the dtype and the moment decision).
        mode: ``"auto"``, ``"gather"`` or ``"reduce"``.
        group: process group (default: the world).

    Returns:
        name → :class:`GlobalStatistics` for every layer some rank has statistics for.
    """
    if mode not in STAT_MODES:
        raise ValueError(f"invalid statistics mode {mode!r}; accepted: {STAT_MODES}")
    names = list(layers)
    world = dist.get_world_size(group)
    # 1. sizes: (present, samples, n_a, n_g, locations) per layer, all-gathered (one collective)
    meta = torch.zeros(len(names), 5, dtype=torch.int64)
    for i, name in enumerate(names):
        st = stats.get(name)
        if st is not None:
            loc = max(1, st.g.shape[0] // max(st.samples, 1))  # T: rows per sample
            meta[i] = torch.tensor([1, st.samples, st.a.shape[0], st.g.shape[0], loc])
    metas = [torch.empty_like(meta) for _ in range(world)]
    with collective("all_gather (statistics sizes)", group):
        dist.all_gather(metas, meta, group=group)
    allmeta = torch.stack(metas)  # (W, L, 5)

    # 2. plan per layer and side; fill the buckets
    plan: list[tuple[str, int, str, str, int]] = []  # name, side index, mode, dtype key, dim
    moment_parts: dict[torch.dtype, list[Tensor]] = {}
    gather_parts: dict[torch.dtype, list[Tensor]] = {}
    for i, name in enumerate(names):
        col = allmeta[:, i]
        if int(col[:, 0].sum()) == 0 or int(col[:, 1].sum()) == 0:
            continue
        st = stats.get(name)
        for side, (factor, key) in enumerate(zip(factors[name], ("a", "g"))):
            counts = col[:, 2 + side]
            how = choose_mode(mode, factor, int(counts.sum()))
            dtype, d = factor.dtype, factor.dim
            rows = getattr(st, key).to(dtype) if st is not None else torch.zeros(0, d, dtype=dtype)
            if how == "reduce":
                moment_parts.setdefault(dtype, []).append(_triu_pack(rows.T @ rows))
            else:
                pad = int(counts.max())
                buf = rows.new_zeros(pad, d)
                buf[: rows.shape[0]] = rows
                gather_parts.setdefault(dtype, []).append(buf.reshape(-1))
            plan.append((name, side, how, str(dtype), d))

    # 3. launch every bucket asynchronously, then wait
    works, reduced, gathered = [], {}, {}
    with collective("all_reduce / all_gather (curvature statistics)", group):
        for dtype, parts in moment_parts.items():
            flat = torch.cat(parts)
            works.append(dist.all_reduce(flat, group=group, async_op=True))
            reduced[dtype] = flat
        for dtype, parts in gather_parts.items():
            flat = torch.cat(parts)
            outs = [torch.empty_like(flat) for _ in range(world)]
            works.append(dist.all_gather(outs, flat, group=group, async_op=True))
            gathered[dtype] = outs
    wait_all(works, "all_reduce / all_gather (curvature statistics)", group)

    # 4. unpack in plan order
    offsets = {("reduce", k): 0 for k in reduced} | {("gather", k): 0 for k in gathered}
    parts_by_layer: dict[str, dict[int, tuple[Tensor, bool]]] = {}
    for name, side, how, _, d in plan:
        i = names.index(name)
        counts = allmeta[:, i, 2 + side]
        dtype = factors[name][side].dtype
        if how == "reduce":
            size = d * (d + 1) // 2
            off = offsets[("reduce", dtype)]
            value = _triu_unpack(reduced[dtype][off : off + size], d)
            offsets[("reduce", dtype)] = off + size
        else:
            pad = int(counts.max())
            off = offsets[("gather", dtype)]
            chunks = [
                outs[off : off + pad * d].view(pad, d)[: int(counts[r])]
                for r, outs in enumerate(gathered[dtype])
            ]
            value = torch.cat(chunks)
            offsets[("gather", dtype)] = off + pad * d
        parts_by_layer.setdefault(name, {})[side] = (value, how == "reduce")

    out: dict[str, GlobalStatistics] = {}
    for name, sides in parts_by_layer.items():
        i = names.index(name)
        col = allmeta[:, i]
        present = col[:, 0] > 0
        total = int(col[:, 1].sum())
        locations = int(col[present, 4].max())
        helper = layers[name]
        (a, a_mom), (g, g_mom) = sides[0], sides[1]
        out[name] = GlobalStatistics(
            a=a,
            a_scale=helper.input_scale(total),
            g=g,
            g_scale=helper.output_grad_scale(total, locations),
            samples=total,
            a_moment=a_mom,
            g_moment=g_mom,
            a_diagonal=helper.diagonal_input,
        )
    return out
