"""Step time of several optimizers on one model, the optimizers taking turns step by step.

On a shared machine the load drifts over minutes, so step times measured in separate training
runs (one optimizer after the other) can differ by more than the optimizers do. Here every
optimizer trains its own copy of the same initial model on the *same* batches, and in every
round each optimizer takes one step (the order rotates from round to round); a round's ratio
``step(opt) / step(sgd)`` compares steps taken seconds apart, and the median over rounds is
reported. A step is what the training loop times: forward, loss, ``zero_grad``, backward,
``optimizer.step()`` (curvature steps included at their share of the rounds).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..data import dataset_info, load_dataset
from ..losses import get_loss
from ..models import build_model, get_model_spec
from ..models.registry import check_model_args
from ..optim.registry import get_optimizer_spec, make_optimizer


@dataclass(frozen=True)
class StepConfig:
    """What :func:`interleaved_step_times` measures.

    Attributes:
        model: registry name of the network.
        data: data set name (its training split gives the batches).
        optimizers: registry names; the first is the reference of the ratios (normally ``sgd``).
        hidden: widths of a model that takes them (``None``: the registry default).
        rounds: timed rounds (each optimizer steps once per round).
        warmup: untimed rounds first (lazy allocations, the first curvature refresh).
        batch_size: samples per step.
        seed: initial weights and batch order.
    """

    model: str
    data: str
    optimizers: tuple[str, ...]
    hidden: tuple[int, ...] | None = None
    rounds: int = 60
    warmup: int = 3
    batch_size: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.optimizers) < 2 or len(set(self.optimizers)) != len(self.optimizers):
            raise ValueError(f"optimizers must name at least two distinct optimizers, got "
                             f"{self.optimizers!r}")
        for name in ("rounds", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be a non-negative integer, got {self.warmup!r}")
        # the model / data set / widths combination, before any data is loaded
        check_model_args(self.model, dataset_info(self.data), self.hidden)


def interleaved_step_times(cfg: StepConfig) -> dict[str, Any]:
    """Median step time per optimizer and the median over rounds of its ratio to the first.

    Returns:
        ``{"config": ..., "rounds": int, "runs": [{"optimizer", "step_time_s_median",
        "ratio_median", "ratio_quartiles": [q1, q3]}, ...]}``.
    """
    train, _ = load_dataset(cfg.data)
    spec = get_model_spec(cfg.model)
    kind = spec.loss_kind
    loss_fn = get_loss(kind).fn
    torch.manual_seed(cfg.seed)
    initial = build_model(cfg.model, train.info, cfg.hidden)
    models, opts = {}, {}
    for name in cfg.optimizers:
        models[name] = copy.deepcopy(initial)
        models[name].train()
        opts[name] = make_optimizer(name, models[name],
                                    lr=get_optimizer_spec(name).lr_for(kind), loss_kind=kind)
    x_all = train.x
    y_all = train.x.reshape(len(train.x), -1) if spec.reconstruct else train.y
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.cat([torch.randperm(len(x_all), generator=gen)
                       for _ in range(1 + (cfg.rounds + cfg.warmup) * cfg.batch_size
                                      // len(x_all))])
    batches = []
    for r in range(cfg.warmup + cfg.rounds):
        idx = order[r * cfg.batch_size:(r + 1) * cfg.batch_size]
        batches.append((x_all[idx], y_all[idx]))
    steps = {name: train_step(models[name], opts[name], loss_fn) for name in cfg.optimizers}
    runs = summarise(round_robin(steps, batches, cfg.warmup))
    return {"config": {**cfg.__dict__, "optimizers": list(cfg.optimizers),
                       "hidden": None if cfg.hidden is None else list(cfg.hidden),
                       "threads": torch.get_num_threads()},
            "params": sum(p.numel() for p in initial.parameters()),
            "rounds": cfg.rounds, "runs": runs}


Step = Callable[[Any, Any], None]


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer,
               loss_fn: Callable[[Any, Any], torch.Tensor]) -> Step:
    """``step(x, y)``: what a training loop times — forward, loss, ``zero_grad``, backward,
    ``opt.step()`` and reading the loss (which waits for the device)."""

    def step(x: Any, y: Any) -> None:
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()

    return step


def round_robin(steps: dict[str, Step], batches: Sequence[tuple[Any, Any]],
                warmup: int) -> dict[str, list[float]]:
    """Seconds per step of each variant, taking turns on the same batches: in round ``r`` every
    variant steps once on ``batches[r]``, the order rotated by ``r``; the first ``warmup``
    rounds are not timed."""
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r, (x, y) in enumerate(batches):
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            t0 = time.perf_counter()
            steps[name](x, y)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def summarise(times: dict[str, list[float]]) -> list[dict[str, Any]]:
    """Per variant: the median step time and the median (and quartiles) over rounds of its
    ratio to the first variant's step in the same round."""
    ref = next(iter(times.values()))
    runs = []
    for name, ts in times.items():
        ratios = sorted(a / b for a, b in zip(ts, ref))
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        runs.append({"optimizer": name, "step_time_s_median": statistics.median(ts),
                     "ratio_median": statistics.median(ratios), "ratio_quartiles": [q[0], q[2]]})
    return runs


def format_steps(doc: dict[str, Any]) -> str:
    """A plain-text table of :func:`interleaved_step_times`' result."""
    from ..report import format_table

    cfg = doc["config"]
    ref = cfg["optimizers"][0]
    rows = [[r["optimizer"], f"{1e3 * r['step_time_s_median']:.1f}",
             f"{r['ratio_median']:.2f}x ({r['ratio_quartiles'][0]:.2f}-"
             f"{r['ratio_quartiles'][1]:.2f})"] for r in doc["runs"]]
    widths = "" if not cfg.get("hidden") else f" {'-'.join(map(str, cfg['hidden']))}"
    head = (f"{cfg['model']}{widths} ({doc['params']:,} parameters) on {cfg['data']}, "
            f"batch {cfg['batch_size']}, {doc['rounds']} rounds taking turns, "
            f"{cfg['threads']} threads")
    return head + "\n" + format_table(["optimizer", "step ms", f"step / {ref} (IQR)"], rows)
