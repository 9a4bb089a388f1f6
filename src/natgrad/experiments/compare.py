"""The comparison experiment behind ``natgrad compare``: one model, several optimizers, the same
start.

Every optimizer starts from identical initial weights and sees the identical batch order (both
from ``seed``). :func:`run_compare` returns the results document (the README's JSON contract)
and, given an output folder, writes ``results.json`` and the plots there; ``natgrad compare`` and
``natgrad reproduce`` both call it.
"""

from __future__ import annotations

import copy
import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ..curvature import unwrap
from ..data import DATASETS, DatasetInfo, load_dataset
from ..data.base import ArrayDataset
from ..distributed import init_from_env, is_main
from ..fisher.tracking import curvature_callback
from ..models import build_model, get_model_spec, save_checkpoint
from ..models.registry import check_model_args
from ..optim.registry import OPTIMIZERS, get_optimizer_spec, make_optimizer
from ..report import format_table, optional_figures, plot_runs, write_json
from .train import TrainConfig, TrainResult, train


@dataclass
class CompareConfig:
    """Settings of :func:`run_compare` (the flags of ``natgrad compare``; see the README).

    Attributes:
        model, hidden: registry name and widths (``None``: the model's default).
        data, data_dir, download, normalize: the data set (:func:`natgrad.data.load_dataset`).
        optimizers: registry names, run in this order.
        epochs, batch_size, seed: training; ``seed`` fixes the initial weights and batch order.
        lrs: learning rate per optimizer (the others use the registry default for the loss).
        optimizer_options: extra keyword arguments per optimizer (e.g.
            ``{"pkfac": {"curvature_every": 1}}``).
        threads: ``torch.set_num_threads`` (``None``: leave as is).
        device: ``"cpu"`` or ``"cuda[:N]"``.
        target_accuracy: threshold for time to target (ignored for reconstruction models).
        save_model: save each trained model (``model.pt`` → ``model-<optimizer>.pt``).
        track_curvature: record the exact Fisher's trace and top eigenvalue after each epoch.
        out: folder for ``results.json`` and plots (``None``: write nothing).
        limit_train, limit_test: use only the first N samples.
        validation: hold out the last N training samples and evaluate on them instead of the
            test set (for choosing hyperparameters without looking at the test set).
        lr_schedule: ``None`` or ``"cosine"`` (:class:`~natgrad.experiments.train.TrainConfig`).
        progress: progress bars (on a terminal only).
    """

    model: str = "mlp"
    hidden: tuple[int, ...] | None = None
    data: str = "mnist5k"
    data_dir: str | None = None
    download: bool = False
    normalize: bool = False
    optimizers: tuple[str, ...] = ("sgd", "adam", "kfac", "pkfac")
    epochs: int = 10
    batch_size: int = 128
    lrs: dict[str, float] = field(default_factory=dict)
    optimizer_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    seed: int = 0
    threads: int | None = None
    device: str = "cpu"
    target_accuracy: float = 0.9
    save_model: str | None = None
    track_curvature: bool = False
    out: str | Path | None = None
    limit_train: int | None = None
    limit_test: int | None = None
    validation: int | None = None
    lr_schedule: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.optimizers = tuple(self.optimizers)
        if self.data not in DATASETS:
            raise ValueError(f"unknown data set {self.data!r}; accepted: {', '.join(DATASETS)}")
        for name in self.optimizers:
            get_optimizer_spec(name)
        if len(set(self.optimizers)) != len(self.optimizers) or not self.optimizers:
            raise ValueError(f"optimizers must be distinct registry names, got {self.optimizers}")
        for name in (*self.lrs, *self.optimizer_options):
            if name not in self.optimizers:
                raise ValueError(f"{name!r} (in lrs/optimizer_options) is not among the "
                                 f"optimizers {self.optimizers}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.lr_schedule not in (None, "cosine"):
            raise ValueError(f"lr_schedule must be None or 'cosine', got {self.lr_schedule!r}")
        for name in ("threads", "limit_train", "limit_test", "validation"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if not 0.0 < self.target_accuracy <= 1.0:
            raise ValueError(f"target_accuracy must be in (0, 1], got {self.target_accuracy}")
        spec = DATASETS[self.data]
        check_model_args(self.model, spec.info, self.hidden)
        if self.normalize and get_model_spec(self.model).reconstruct:
            raise ValueError(f"normalize cannot be used with --model {self.model} "
                             "(it needs [0, 1] pixels)")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"device must be cpu or cuda[:N], got {self.device!r}") from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda[:N], got {self.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda: CUDA is not available in this torch build / machine")


def checkpoint_path(path: str | Path, optimizer: str) -> Path:
    """``model.pt`` → ``model-<optimizer>.pt`` (``.pt`` added when there is no suffix)."""
    path = Path(path)
    return path.with_name(f"{path.stem}-{optimizer}{path.suffix or '.pt'}")


def load_data(cfg: CompareConfig) -> tuple[ArrayDataset, ArrayDataset]:
    """The train and test sets of ``cfg`` (limits applied); ``DataError`` when files are bad."""
    train_set, test_set = load_dataset(cfg.data, cfg.data_dir, cfg.download, cfg.normalize)
    if cfg.limit_train is not None:
        train_set = train_set.subset(cfg.limit_train)
    if cfg.limit_test is not None:
        test_set = test_set.subset(cfg.limit_test)
    if cfg.validation is not None:
        n = len(train_set) - cfg.validation
        if n < 1:
            raise ValueError(f"validation={cfg.validation} leaves no training samples "
                             f"(the training set has {len(train_set)})")
        x, y = train_set.x, train_set.y
        train_set, test_set = (ArrayDataset(x[:n], y[:n], train_set.info),
                               ArrayDataset(x[n:], y[n:], train_set.info))
    return train_set, test_set


def targets(dataset: ArrayDataset, reconstruct: bool) -> TensorDataset:
    """``(x, y)``, or ``(x, x.flatten(1))`` (a view) for reconstruction models."""
    if reconstruct:
        return TensorDataset(dataset.x, dataset.x.reshape(len(dataset), -1))
    return TensorDataset(dataset.x, dataset.y)


def preconditioned_fraction(optimizer: Any, model: nn.Module) -> float:
    """The fraction of the model's parameters (by count) in layers natgrad preconditions for
    ``optimizer`` (0 for a first-order optimizer)."""
    curvature = getattr(optimizer, "curvature", None)  # natgrad.KFAC, PreconditionedOptimizer
    if curvature is None or not getattr(optimizer, "precondition", False):
        return 0.0
    covered = {id(p) for h in curvature.layers.values() for p in h.params}
    params = list(unwrap(model).parameters())
    total = sum(p.numel() for p in params)
    return sum(p.numel() for p in params if id(p) in covered) / max(total, 1)


def run_record(name: str, cfg: CompareConfig, info: DatasetInfo, lr: float, loss_kind: str,
               result: TrainResult, num_params: int) -> dict[str, Any]:
    """One run's entry of ``results.json``."""
    final = result.final
    return {
        "optimizer": name,
        "model": cfg.model,
        "dataset": info.name,
        "epochs": len(result.history),
        "test_accuracy": final.get("test_accuracy"),
        "test_loss": final.get("test_loss"),
        "train_loss": final.get("train_loss"),
        "wall_time_s": result.wall_time_s,
        "step_time_s_median": result.step_time_s_median,
        "time_to_target_s": result.time_to_target_s,
        "history": result.history,
        "lr": lr,
        "loss_kind": loss_kind,
        "eval_time_s": result.eval_time_s,
        "steps": len(result.step_times_s),
        "num_params": num_params,
        "diverged": result.diverged,
    }


def history_table(run: dict[str, Any]) -> str:
    rows = [[r["epoch"], r["time_s"], r["train_loss"], r["test_loss"], r["test_accuracy"]]
            for r in run["history"]]
    return format_table(["epoch", "time_s", "train_loss", "test_loss", "test_acc"], rows)


def summary_table(runs: list[dict[str, Any]], reconstruct: bool) -> str:
    first = "test_recon_loss" if reconstruct else "test_acc"
    headers = [
        "optimizer", first, "test_loss", "train_loss", "wall_s", "step_ms_median", "to_target_s",
    ]
    rows = []
    for r in runs:
        target = r["time_to_target_s"]
        rows.append([
            r["optimizer"] + (" (diverged)" if r["diverged"] else ""),
            r["test_loss"] if reconstruct else r["test_accuracy"],
            r["test_loss"],
            r["train_loss"],
            r["wall_time_s"],
            1e3 * r["step_time_s_median"] if r["step_time_s_median"] is not None else None,
            "n/a" if reconstruct else (target if target is not None else "never"),
        ])
    return format_table(headers, rows)


def _quiet(*args: Any, **kwargs: Any) -> None:
    """``print`` on ranks other than 0."""


def run_compare(cfg: CompareConfig, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Load the data, train once per optimizer, report; returns the ``results.json`` document.

    ``say`` receives the tables (on rank 0 only under ``torchrun``).
    """
    from .. import __version__

    device = torch.device(cfg.device)
    dist_info = init_from_env(device=str(device))  # torchrun: one process per rank
    say = say if is_main() else _quiet
    train_set, test_set = load_data(cfg)
    info = train_set.info
    spec = get_model_spec(cfg.model)
    loss_kind = spec.loss_kind
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if dist_info.distributed:
        device = dist_info.device

    torch.manual_seed(cfg.seed)
    initial = build_model(cfg.model, info, cfg.hidden)
    num_params = sum(p.numel() for p in initial.parameters())
    train_data = targets(train_set, spec.reconstruct)
    test_data = targets(test_set, spec.reconstruct)
    say(
        f"natgrad compare: {cfg.model} ({num_params:,} parameters) on {info.name} "
        f"({len(train_set)} train / {len(test_set)} test), loss {loss_kind}, "
        f"{cfg.epochs} epochs, batch {cfg.batch_size}, {torch.get_num_threads()} threads, "
        f"{device}"
    )

    runs = []
    for name in cfg.optimizers:
        lr = cfg.lrs.get(name, get_optimizer_spec(name).lr_for(loss_kind))
        model = copy.deepcopy(initial).to(device)
        if dist_info.distributed:  # gradients averaged by DDP; K-FAC unwraps it for its hooks
            model = nn.parallel.DistributedDataParallel(model)
        optimizer = make_optimizer(name, model, lr=lr, loss_kind=loss_kind,
                                   **cfg.optimizer_options.get(name, {}))
        config = TrainConfig(
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            target_accuracy=None if spec.reconstruct else cfg.target_accuracy,
            device=str(device),
            progress=cfg.progress and is_main(),
            desc=name,
            lr_schedule=cfg.lr_schedule,
        )
        callbacks = []
        if cfg.track_curvature:
            tracker = curvature_callback(train_data.tensors, loss_kind, samples=256, seed=cfg.seed)
            callbacks.append(tracker)
        result = train(model, optimizer, train_data, test_data, loss_kind, config, callbacks)
        record = run_record(name, cfg, info, lr, loss_kind, result, num_params)
        record["preconditioned_fraction"] = preconditioned_fraction(optimizer, model)
        if cfg.track_curvature:
            record["curvature"] = tracker.records
        runs.append(record)
        say(f"\n{name} (lr {lr:g})\n{history_table(record)}")
        if cfg.save_model and is_main():
            path = checkpoint_path(cfg.save_model, name)
            save_checkpoint(path, unwrap(model), cfg.model, info, cfg.hidden, optimizer=name,
                            lr=lr)
            record["checkpoint"] = str(path)

    say(f"\nsummary\n{summary_table(runs, spec.reconstruct)}")
    config = {
        **{k: v for k, v in asdict(cfg).items() if k not in ("lrs", "out")},
        "out": None if cfg.out is None else str(cfg.out),
        "optimizers": list(cfg.optimizers),
        "lr": {r["optimizer"]: r["lr"] for r in runs},
        "hidden": list(cfg.hidden or spec.default_hidden) or None,
        "loss_kind": loss_kind,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
        "torch": torch.__version__,
        "natgrad": __version__,
        "python": platform.python_version(),
        "train_size": len(train_set),
        "test_size": len(test_set),
        "world_size": dist_info.world_size,
    }
    doc: dict[str, Any] = {"config": config, "runs": runs, "plots": []}
    if cfg.out is not None and is_main():
        out = Path(cfg.out)
        plots = optional_figures(plot_runs, runs, out)
        doc["plots"] = [p.name for p in plots]
        write_json(out / "results.json", doc)
        say(f"\nwrote {out / 'results.json'} and {', '.join(doc['plots']) or 'no plots'}")
    return doc


__all__ = ["OPTIMIZERS", "CompareConfig", "checkpoint_path", "load_data", "run_compare"]
