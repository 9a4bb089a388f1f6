"""Single-process units of natgrad.distributed: assignment, shards, moment updates, no-op path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import natgrad
from natgrad.distributed import (
    SingleProcess,
    assign_lpt,
    factor_cost,
    init_from_env,
    is_main,
    resolve,
    shard,
    shard_bounds,
    update_factor,
)
from natgrad.distributed.assignment import loads
from natgrad.distributed.statistics import _triu_pack, _triu_unpack, choose_mode
from natgrad.factors import make_factor


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_lpt_covers_every_layer_exactly_once(world):
    costs = {f"l{i}": float(c) for i, c in enumerate([64, 8, 27, 27, 1, 125, 0, 8])}
    owner = assign_lpt(costs, world)
    assert list(owner) == list(costs)  # every job once, in input order
    assert all(0 <= r < world for r in owner.values())
    load = loads(owner, costs, world)
    assert sum(load) == pytest.approx(sum(costs.values()))
    # LPT bound: makespan <= 4/3 OPT, and OPT >= max(total / world, largest job)
    opt_lb = max(sum(costs.values()) / world, max(costs.values()))
    assert max(load) <= 4 / 3 * opt_lb + 1e-9 or max(load) == max(costs.values())


def test_lpt_balances_and_is_deterministic():
    costs = [("a", 10.0), ("b", 10.0), ("c", 5.0), ("d", 5.0)]
    assert assign_lpt(costs, 2) == {"a": 0, "b": 1, "c": 0, "d": 1}
    assert assign_lpt(costs, 2) == assign_lpt(costs, 2)
    with pytest.raises(ValueError):
        assign_lpt(costs, 0)
    with pytest.raises(ValueError):
        assign_lpt([("a", 1.0), ("a", 2.0)], 2)


def test_cost_model_orders_strategies():
    d = 512
    assert factor_cost(make_factor("eigh", d)) > factor_cost(make_factor("cholesky", d))
    assert factor_cost(make_factor("projected", d, rank=16)) < factor_cost(make_factor("eigh", d))


def test_shard_slices_concatenate_to_the_batch():
    x = torch.arange(11)
    parts = [shard(x, r, 3) for r in range(3)]
    assert torch.equal(torch.cat(parts), x)
    assert [len(p) for p in parts] == [4, 4, 3]
    assert shard_bounds(10, 1, 2) == (5, 10)
    xs, ys = shard((x, x + 1), 1, 3)
    assert torch.equal(ys, xs + 1)
    assert shard(x) is not None and torch.equal(shard(x), x)  # single process: everything


def test_single_process_helpers_are_noops(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_from_env()
    assert not info.distributed and info.rank == 0 and is_main()
    assert isinstance(resolve(None), SingleProcess) and isinstance(resolve(False), SingleProcess)
    with pytest.raises(RuntimeError, match="process group"):
        resolve(True)
    with pytest.raises(ValueError, match="distributed"):
        resolve("yes")


@pytest.mark.parametrize("strategy", ["eigh", "cholesky"])
def test_moment_update_equals_row_update(strategy):
    torch.manual_seed(0)
    rows = [torch.randn(7, 5, dtype=torch.float64) for _ in range(3)]
    a = make_factor(strategy, 5, dtype=torch.float64)
    b = make_factor(strategy, 5, dtype=torch.float64)
    assert a.supports_moment
    for X in rows:
        a.update(X, 1 / 7, 0.9)
        S = _triu_unpack(_triu_pack(X.T @ X), 5)
        update_factor(b, S, 1 / 7, 0.9, moment=True)
    torch.testing.assert_close(a.to_dense(), b.to_dense())
    assert a.updates == b.updates == 3


def test_mode_choice():
    dense, proj = make_factor("eigh", 100), make_factor("projected", 100, rank=8)
    assert choose_mode("auto", dense, 500) == "reduce"
    assert choose_mode("auto", dense, 50) == "gather"
    assert choose_mode("reduce", proj, 500) == "gather"  # row-based strategies need rows
    assert not proj.supports_moment and not make_factor("recursive", 10).supports_moment
    with pytest.raises(TypeError, match="projected"):
        update_factor(proj, torch.eye(100), 1.0, 0.9, moment=True)
    assert proj.updates == 0


def test_single_process_kfac_unchanged_by_default():
    """No process group: KFAC uses the no-op coordinator and behaves as before."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    opt = natgrad.KFAC(model)
    assert isinstance(opt.distributed, SingleProcess) and not opt.distributed.active
