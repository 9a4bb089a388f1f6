"""Problems and per-rank programs for the distributed tests (importable by spawned workers)."""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad.distributed import DistributedKFAC, shard
from natgrad.factors import STRATEGIES

GLOBAL_BATCH = 8
STEPS = 4
MID = 2  # checkpoint taken after this many steps

KFAC_KW: dict[str, Any] = dict(
    lr=0.1, damping=1e-2, momentum=0.9, weight_decay=1e-3, factor_decay=0.9, inverse_every=2,
    kl_clip=1e-2,
)


def make_model(seed: int = 0, hidden: int = 10) -> nn.Module:
    """Conv (T = 16 locations) + two Linear layers, float64."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
        nn.Linear(3 * 4 * 4, hidden), nn.Tanh(), nn.Linear(hidden, 4),
    ).double()


def make_data(seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(GLOBAL_BATCH, 2, 4, 4, generator=g, dtype=torch.float64),
         torch.randint(0, 4, (GLOBAL_BATCH,), generator=g))
        for _ in range(STEPS)
    ]


def strategy_options(strategy: str) -> dict[str, Any]:
    if strategy == "projected":
        return {"factor_options": {"rank": 4}}
    return {}


def configs() -> dict[str, dict[str, Any]]:
    """Equivalence scenarios: name -> options."""
    out = {
        "eigh-ddp-auto": dict(strategy="eigh", wrap="ddp", statistics="auto", broadcast="inverse"),
        "eigh-allreduce-gradient": dict(strategy="eigh", wrap="allreduce", statistics="reduce",
                                        broadcast="gradient"),
        "cholesky-allreduce-gather": dict(strategy="cholesky", wrap="allreduce",
                                          statistics="gather", broadcast="inverse"),
        "cholesky-ddp-reduce": dict(strategy="cholesky", wrap="ddp", statistics="reduce",
                                    broadcast="inverse"),
    }
    if "projected" in STRATEGIES:  # owner updates, broadcasts U, λ, σ, tr
        out["projected-ddp-auto"] = dict(strategy="projected", wrap="ddp", statistics="auto",
                                         broadcast="inverse")
        out["projected-allreduce-gradient"] = dict(strategy="projected", wrap="allreduce",
                                                   statistics="auto", broadcast="gradient")
    if "recursive" in STRATEGIES:
        out["recursive-ddp-auto"] = dict(strategy="recursive", wrap="ddp", statistics="auto",
                                         broadcast="inverse")
    return out


def make_kfac(model: nn.Module, strategy: str, distributed: Any = False,
              fisher: str = "empirical") -> natgrad.KFAC:
    return natgrad.KFAC(model, fisher=fisher, factors=strategy, distributed=distributed,
                        **strategy_options(strategy), **KFAC_KW)


def train_steps(model: nn.Module, opt: natgrad.KFAC, batches: list, allreduce: bool = False
                ) -> None:
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if allreduce:  # plain torch.distributed gradient averaging instead of DDP
            world = dist.get_world_size()
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()


def reference(strategy: str, steps: int = STEPS) -> dict[str, Any]:
    """One process on the concatenated global batches."""
    model = make_model()
    opt = make_kfac(model, strategy)
    train_steps(model, opt, make_data()[:steps])
    return {"params": [p.detach().clone() for p in model.parameters()], "sd": opt.state_dict()}


def run_config(rank: int, world: int, strategy: str, wrap: str, statistics: str,
               broadcast: str) -> dict[str, Any]:
    model = make_model()
    net: nn.Module = nn.parallel.DistributedDataParallel(model) if wrap == "ddp" else model
    opt = make_kfac(net, strategy, DistributedKFAC(statistics=statistics, broadcast=broadcast))
    local = [shard(b) for b in make_data()]
    train_steps(net, opt, local[:MID], allreduce=wrap == "allreduce")
    opt.distributed.sync_state()
    # deep copies: Optimizer.state_dict() returns the live momentum buffers
    mid = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    train_steps(net, opt, local[MID:], allreduce=wrap == "allreduce")
    opt.distributed.sync_state()
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "sd": opt.state_dict(),
        "mid": mid,
        "owner": dict(opt.distributed.owner),
    }


def equivalence_worker(rank: int, world: int) -> dict[str, Any]:
    """Every equivalence scenario, plus the MC/DDP and mismatched-model checks, in one launch."""
    out: dict[str, Any] = {name: run_config(rank, world, **cfg) for name, cfg in configs().items()}
    out["mc-ddp"] = mc_ddp_check(rank, world)
    out["mismatch"] = mismatch_check(rank, world)
    return out


def mc_ddp_check(rank: int, world: int) -> dict[str, Any]:
    """The MC backward inside the forward hook must leave DDP's gradient averaging intact."""
    model = make_model()
    plain = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = make_kfac(ddp, "eigh", distributed=None, fisher="mc")  # None: automatic
    max_err = 0.0
    for x, y in [shard(b) for b in make_data()]:
        loss = F.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        plain.load_state_dict(model.state_dict())
        plain.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        for p, q in zip(model.parameters(), plain.parameters()):
            ref = q.grad.clone()
            dist.all_reduce(ref)
            max_err = max(max_err, float((p.grad - ref / world).abs().max()))
        opt.step()
    assert type(opt.distributed).__name__ == "DistributedKFAC"
    return {"max_grad_err": max_err, "params": [p.detach().clone() for p in model.parameters()],
            "mc_stats_nonzero": float(opt.factors["5"][1].trace()) > 0}


def mismatch_check(rank: int, world: int) -> dict[str, Any]:
    model = make_model(hidden=10 + rank)
    try:
        make_kfac(model, "eigh", DistributedKFAC())
    except ValueError as err:
        return {"raised": True, "message": str(err)}
    return {"raised": False, "message": ""}


def dead_rank_worker(rank: int, world: int) -> str:
    """Rank 1 dies after set-up; rank 0's next K-FAC step must fail with a clear error."""
    model = make_model()
    opt = make_kfac(model, "eigh", DistributedKFAC())
    if rank == 1:
        os._exit(0)
    x, y = shard(make_data()[0])
    F.cross_entropy(model(x), y).backward()
    try:
        opt.step()
    except natgrad.distributed.DistributedError as err:
        return str(err)
    return "no error"
