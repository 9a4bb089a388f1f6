"""A plain ``torch.optim``-style training loop with evaluation, timing and callbacks.

The loop is the textbook one::

    out = model(x); loss = loss_fn(out, y); opt.zero_grad(); loss.backward(); opt.step()

with the model in train mode and autograd on, so optimizers that work through module hooks
(K-FAC) need nothing more.

Timing definitions (seconds, ``time.perf_counter``; CUDA is synchronised before each reading):

* *step time*: one step — batch gather, forward, backward, ``optimizer.step()``.
* *training time*: wall time of the epoch loops (shuffling plus all steps), **excluding**
  evaluation and callbacks. ``history[i]["time_s"]`` is the cumulative training time at the end of
  epoch ``i``; ``wall_time_s`` is the total.
* *evaluation time*: wall time of the per-epoch evaluations, reported separately
  (``eval_time_s``).
* *time to target*: the cumulative training time at the first epoch-end evaluation whose test
  accuracy is ≥ the target; ``None`` if never reached (or the loss has no accuracy).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ..distributed import all_reduce_sum, is_main, shard
from ..losses import LossKind, get_loss
from ..progress import progress_bar

HistoryRow = dict[str, Any]
Callback = Callable[[int, nn.Module, HistoryRow], None]


@dataclass
class TrainConfig:
    """Settings of one training run.

    Attributes:
        epochs: passes over the training set (> 0).
        batch_size: samples per step (> 0); the last batch of an epoch may be smaller.
        seed: seeds the batch order (a ``torch.Generator``), so it is identical across runs.
        target_accuracy: for ``time_to_target_s``; ``None`` to skip.
        device: where model and data live (``"cpu"``, ``"cuda"``).
        progress: show a progress bar (only drawn on a terminal; see :mod:`natgrad.progress`).
        eval_batch_size: samples per evaluation forward pass.
        desc: label of the progress bar.
        lr_schedule: ``None`` (constant) or ``"cosine"``: every group's learning rate follows a
            cosine from its initial value to 0 over all steps (``CosineAnnealingLR``, stepped
            after every step).
    """

    epochs: int = 10
    batch_size: int = 128
    seed: int = 0
    target_accuracy: float | None = 0.9
    device: str = "cpu"
    progress: bool = True
    eval_batch_size: int = 1000
    desc: str = ""
    lr_schedule: str | None = None

    def __post_init__(self) -> None:
        if self.lr_schedule not in (None, "cosine"):
            raise ValueError(f"invalid lr_schedule={self.lr_schedule!r}: accepted values: "
                             "None, 'cosine'")
        if self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.eval_batch_size <= 0:
            raise ValueError(f"eval_batch_size must be positive, got {self.eval_batch_size}")


@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    Attributes:
        history: one row per epoch: ``epoch``, ``time_s`` (cumulative training time),
            ``train_loss`` (sample-weighted mean of the epoch's batch losses), ``test_loss``,
            ``test_accuracy`` (``None`` without accuracy), ``eval_time_s``.
        wall_time_s: total training time (see the module docstring).
        eval_time_s: total evaluation time.
        step_times_s: every step's time.
        time_to_target_s: see the module docstring.
        diverged: the training loss became NaN or infinite (training stopped there).
    """

    history: list[HistoryRow] = field(default_factory=list)
    wall_time_s: float = 0.0
    eval_time_s: float = 0.0
    step_times_s: list[float] = field(default_factory=list)
    time_to_target_s: float | None = None
    diverged: bool = False

    @property
    def step_time_s_median(self) -> float | None:
        """Median step time, ``None`` before any step."""
        return statistics.median(self.step_times_s) if self.step_times_s else None

    @property
    def final(self) -> HistoryRow:
        """The last history row (empty before any epoch)."""
        return self.history[-1] if self.history else {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: TensorDataset,
    loss: LossKind | str,
    batch_size: int = 1000,
    device: str | torch.device = "cpu",
) -> tuple[float, float | None]:
    """Mean loss and accuracy of ``model`` on ``dataset`` (tensors ``x (N, …)``, ``y (N, …)``).

    Runs in eval mode under ``torch.no_grad`` and restores the previous train/eval mode.
    Accuracy is ``None`` for loss kinds without one.
    """
    loss = get_loss(loss) if isinstance(loss, str) else loss
    device = torch.device(device)
    x_all, y_all = dataset.tensors[0], dataset.tensors[1]
    n = x_all.shape[0]
    was_training = model.training
    model.eval()
    total, correct, counted = 0.0, 0, 0
    try:
        for start in range(0, n, batch_size):
            x = x_all[start : start + batch_size].to(device)
            y = y_all[start : start + batch_size].to(device)
            out = model(x)
            total += loss.fn(out, y).item() * x.shape[0]
            if loss.has_accuracy:  # per sample, or per position for sequence logits
                correct += (out.argmax(dim=-1) == y).sum().item()
                counted += y.numel()
    finally:
        model.train(was_training)
    mean = total / max(n, 1)
    return mean, (correct / max(counted, 1) if loss.has_accuracy else None)


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_set: TensorDataset,
    test_set: TensorDataset,
    loss_kind: str,
    config: TrainConfig | None = None,
    callbacks: Sequence[Callback] = (),
) -> TrainResult:
    """Train ``model`` with ``optimizer`` and evaluate on ``test_set`` after every epoch.

    Args:
        model: the network, already on ``config.device``.
        optimizer: any ``torch.optim.Optimizer`` over the model's parameters.
        train_set, test_set: ``TensorDataset``-like objects whose ``tensors`` are ``(x, y)``;
            ``y`` is whatever the loss expects (labels, or the flattened input for autoencoders).
        loss_kind: key of :data:`natgrad.losses.LOSSES`.
        config: settings (defaults: :class:`TrainConfig`).
        callbacks: called as ``cb(epoch, model, history_row)`` after each epoch's evaluation, with
            the model back in train mode; their time counts as neither training nor evaluation.

    Returns:
        A :class:`TrainResult`.
    """
    config = config or TrainConfig()
    loss = get_loss(loss_kind)
    device = torch.device(config.device)
    x_all = train_set.tensors[0].to(device)
    y_all = train_set.tensors[1].to(device)
    n = x_all.shape[0]
    if n == 0:
        raise ValueError("the training set is empty")
    steps_per_epoch = math.ceil(n / config.batch_size)
    generator = torch.Generator().manual_seed(config.seed)
    result = TrainResult()
    train_time = 0.0
    model.train()
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=config.epochs * steps_per_epoch) if config.lr_schedule else None)
    bar = progress_bar(
        total=config.epochs * steps_per_epoch,
        desc=config.desc or None,
        disable=not config.progress or not is_main(),
        leave=False,
        dynamic_ncols=True,
    )
    try:
        for epoch in range(1, config.epochs + 1):
            _sync(device)
            epoch_start = time.perf_counter()
            order = torch.randperm(n, generator=generator).to(device)
            epoch_loss = 0.0
            for start in range(0, n, config.batch_size):
                t0 = time.perf_counter()
                idx = order[start : start + config.batch_size]
                x, y = shard((x_all[idx], y_all[idx]))  # this rank's part of the global batch
                out = model(x)
                batch_loss = loss.fn(out, y)
                optimizer.zero_grad()
                batch_loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                value = batch_loss.item()  # synchronises on CUDA
                result.step_times_s.append(time.perf_counter() - t0)
                epoch_loss += value * x.shape[0]
                bar.update(1)
                if all_reduce_sum(0.0 if math.isfinite(value) else 1.0) > 0:  # every rank stops
                    result.diverged = True
                    break
            _sync(device)
            train_time += time.perf_counter() - epoch_start
            epoch_loss = all_reduce_sum(epoch_loss)
            bar.set_postfix(loss=f"{epoch_loss / n:.4g}")

            t_eval = time.perf_counter()
            test_loss, test_acc = evaluate(model, test_set, loss, config.eval_batch_size, device)
            eval_time = time.perf_counter() - t_eval
            result.eval_time_s += eval_time
            row: HistoryRow = {
                "epoch": epoch,
                "time_s": train_time,
                "train_loss": epoch_loss / n if not result.diverged else float("nan"),
                "test_loss": test_loss,
                "test_accuracy": test_acc,
                "eval_time_s": eval_time,
            }
            result.history.append(row)
            if (
                result.time_to_target_s is None
                and config.target_accuracy is not None
                and test_acc is not None
                and test_acc >= config.target_accuracy
            ):
                result.time_to_target_s = train_time
            for callback in callbacks:
                callback(epoch, model, row)
            if result.diverged:
                break
    finally:
        bar.close()
    result.wall_time_s = train_time
    return result
