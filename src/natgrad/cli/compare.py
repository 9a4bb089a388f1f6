"""``natgrad compare``: train one model with several optimizers from the same start and compare.

Every optimizer starts from identical initial weights and sees the identical batch order (both
from ``--seed``). Writes ``results.json`` and PNG plots to ``--out``; see the README for the JSON
contract.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from .. import __version__
from ..data import DATASETS, DataError, DatasetInfo, load_dataset
from ..data.base import ArrayDataset
from ..distributed import init_from_env, is_main
from ..fisher.tracking import curvature_callback
from ..models import MODELS, build_model, get_model_spec, save_checkpoint
from ..models.registry import check_model_args
from ..optim.kfac import unwrap
from ..optim.registry import OPTIMIZERS, get_optimizer_spec, make_optimizer
from ..report import format_table, optional_figures, plot_runs, write_json
from ..train import TrainConfig, TrainResult, train
from .common import UsageError, parse_lrs, parse_names, parse_widths

DEFAULT_OPTIMIZERS = "sgd,adam,kfac,pkfac"
DEFAULT_EPOCHS = 10


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``compare`` on the top-level parser."""
    p = subparsers.add_parser(
        "compare",
        help="train a model with several optimizers and compare time and accuracy",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--model", default="mlp", choices=list(MODELS), help="network (default mlp)")
    p.add_argument(
        "--hidden", metavar="W1,W2,...",
        help="widths: MLP hidden layers (default 256,128); autoencoder encoder (1000,500,250,30)",
    )
    p.add_argument(
        "--data", default="mnist5k", metavar="NAME",
        help=f"data set: {', '.join(DATASETS)} (default mnist5k, embedded)",
    )
    p.add_argument("--data-dir", metavar="DIR", help="directory with the data files")
    p.add_argument(
        "--download", action="store_true", help="fetch missing files with torchvision, if usable"
    )
    p.add_argument("--normalize", action="store_true", help="standardise inputs per channel")
    p.add_argument(
        "--optimizers", default=DEFAULT_OPTIMIZERS, metavar="A,B,...",
        help=f"comma list from {', '.join(OPTIMIZERS)} (default {DEFAULT_OPTIMIZERS})",
    )
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                   help=f"epochs per optimizer (default {DEFAULT_EPOCHS})")
    p.add_argument("--batch-size", type=int, default=128, help="default 128")
    p.add_argument(
        "--lr", action="append", metavar="NAME=VALUE",
        help="learning rate per optimizer, repeatable or comma list (e.g. sgd=0.05,adam=1e-3); "
        "defaults: " + ", ".join(f"{k}={v.default_lr:g}" for k, v in OPTIMIZERS.items()),
    )
    p.add_argument("--seed", type=int, default=0, help="initial weights and batch order")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--target-accuracy", type=float, default=0.9,
                   help="for time-to-target (default 0.9)")
    p.add_argument(
        "--save-model", metavar="PATH",
        help="save each trained model to PATH with the optimizer name appended to the stem "
        "(model.pt -> model-sgd.pt); rebuild with natgrad.models.load_checkpoint",
    )
    p.add_argument(
        "--track-curvature", action="store_true",
        help="after each epoch, record the exact Fisher's trace and largest eigenvalue on 256 "
        "training samples (results.json 'curvature', curvature_vs_epoch.png)",
    )
    p.add_argument("--out", default="runs/compare", metavar="DIR",
                   help="output directory (default runs/compare)")
    p.add_argument("--limit-train", type=int, metavar="N",
                   help="use only the first N training samples (quick checks)")
    p.add_argument("--limit-test", type=int, metavar="N",
                   help="use only the first N test samples (quick checks)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def checkpoint_path(path: str | Path, optimizer: str) -> Path:
    """``model.pt`` → ``model-<optimizer>.pt`` (``.pt`` added when there is no suffix)."""
    path = Path(path)
    return path.with_name(f"{path.stem}-{optimizer}{path.suffix or '.pt'}")


def validate(args: argparse.Namespace) -> dict[str, Any]:
    """Check every argument before any work; raises :class:`UsageError` with one line."""
    if args.data not in DATASETS:
        raise UsageError(f"unknown data set {args.data!r}; accepted: {', '.join(DATASETS)}")
    names = parse_names(args.optimizers, OPTIMIZERS, "optimizer")
    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size)):
        if value <= 0:
            raise UsageError(f"{flag} must be a positive integer, got {value}")
    for flag, value in (
        ("--threads", args.threads),
        ("--limit-train", args.limit_train),
        ("--limit-test", args.limit_test),
    ):
        if value is not None and value <= 0:
            raise UsageError(f"{flag} must be a positive integer, got {value}")
    if not 0.0 < args.target_accuracy <= 1.0:
        raise UsageError(f"--target-accuracy must be in (0, 1], got {args.target_accuracy}")
    lrs = parse_lrs(args.lr, names)
    hidden = parse_widths(args.hidden) if args.hidden is not None else None
    spec = DATASETS[args.data]
    try:
        check_model_args(args.model, spec.info, hidden)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.normalize and get_model_spec(args.model).reconstruct:
        raise UsageError(
            f"--normalize cannot be used with --model {args.model} (it needs [0, 1] pixels)"
        )
    if spec.needs_root:
        files = ", ".join(spec.files)
        if args.data_dir is None:
            raise UsageError(f"--data {args.data} needs --data-dir DIR containing {files}")
        if not args.download and not Path(args.data_dir).is_dir():
            raise UsageError(f"--data-dir {args.data_dir}: no such directory (expected {files})")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available in this torch build / machine")
    return {"optimizers": names, "lrs": lrs, "hidden": hidden, "device": device}


def _load(args: argparse.Namespace) -> tuple[ArrayDataset, ArrayDataset]:
    try:
        train_set, test_set = load_dataset(args.data, args.data_dir, args.download, args.normalize)
    except DataError as exc:
        raise UsageError(str(exc)) from None
    if args.limit_train is not None:
        train_set = train_set.subset(args.limit_train)
    if args.limit_test is not None:
        test_set = test_set.subset(args.limit_test)
    return train_set, test_set


def _targets(dataset: ArrayDataset, reconstruct: bool) -> TensorDataset:
    """``(x, y)``, or ``(x, x.flatten(1))`` (a view) for reconstruction models."""
    if reconstruct:
        return TensorDataset(dataset.x, dataset.x.reshape(len(dataset), -1))
    return TensorDataset(dataset.x, dataset.y)


def _run_record(
    name: str, args: argparse.Namespace, info: DatasetInfo, lr: float, loss_kind: str,
    result: TrainResult, num_params: int,
) -> dict[str, Any]:
    final = result.final
    return {
        "optimizer": name,
        "model": args.model,
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


def _history_table(run: dict[str, Any]) -> str:
    rows = [
        [r["epoch"], r["time_s"], r["train_loss"], r["test_loss"], r["test_accuracy"]]
        for r in run["history"]
    ]
    return format_table(["epoch", "time_s", "train_loss", "test_loss", "test_acc"], rows)


def _summary_table(runs: list[dict[str, Any]], reconstruct: bool) -> str:
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


def run(args: argparse.Namespace) -> int:
    """Validate, load the data, train once per optimizer, print tables, write JSON and plots."""
    checked = validate(args)
    dist_info = init_from_env(device=str(checked["device"]))  # torchrun: one process per rank
    say = print if is_main() else _quiet
    train_set, test_set = _load(args)
    info = train_set.info
    spec = get_model_spec(args.model)
    loss_kind = spec.loss_kind
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = dist_info.device if dist_info.distributed else checked["device"]

    torch.manual_seed(args.seed)
    initial = build_model(args.model, info, checked["hidden"])
    num_params = sum(p.numel() for p in initial.parameters())
    train_data = _targets(train_set, spec.reconstruct)
    test_data = _targets(test_set, spec.reconstruct)
    say(
        f"natgrad compare: {args.model} ({num_params:,} parameters) on {info.name} "
        f"({len(train_set)} train / {len(test_set)} test), loss {loss_kind}, "
        f"{args.epochs} epochs, batch {args.batch_size}, {torch.get_num_threads()} threads, "
        f"{device}"
    )

    runs = []
    for name in checked["optimizers"]:
        lr = checked["lrs"].get(name, get_optimizer_spec(name).lr_for(loss_kind))
        model = copy.deepcopy(initial).to(device)
        if dist_info.distributed:  # gradients averaged by DDP; K-FAC unwraps it for its hooks
            model = nn.parallel.DistributedDataParallel(model)
        optimizer = make_optimizer(name, model, lr=lr, loss_kind=loss_kind)
        config = TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            target_accuracy=None if spec.reconstruct else args.target_accuracy,
            device=str(device),
            progress=not args.no_progress and is_main(),
            desc=name,
        )
        callbacks = []
        if args.track_curvature:
            tracker = curvature_callback(train_data.tensors, loss_kind, samples=256, seed=args.seed)
            callbacks.append(tracker)
        result = train(model, optimizer, train_data, test_data, loss_kind, config, callbacks)
        record = _run_record(name, args, info, lr, loss_kind, result, num_params)
        if args.track_curvature:
            record["curvature"] = tracker.records
        runs.append(record)
        say(f"\n{name} (lr {lr:g})\n{_history_table(record)}")
        if args.save_model and is_main():
            path = checkpoint_path(args.save_model, name)
            save_checkpoint(
                path, unwrap(model), args.model, info, checked["hidden"], optimizer=name, lr=lr
            )
            record["checkpoint"] = str(path)

    say(f"\nsummary\n{_summary_table(runs, spec.reconstruct)}")
    out = Path(args.out)
    config = {
        **{k: v for k, v in vars(args).items() if k != "func"},
        "optimizers": checked["optimizers"],
        "lr": {r["optimizer"]: r["lr"] for r in runs},
        "hidden": list(checked["hidden"] or spec.default_hidden) or None,
        "loss_kind": loss_kind,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
        "torch": torch.__version__,
        "natgrad": __version__,
        "python": platform.python_version(),
        "train_size": len(train_set),
        "test_size": len(test_set),
    }
    if not is_main():
        return 0
    config["world_size"] = dist_info.world_size
    plots = optional_figures(plot_runs, runs, out)
    write_json(out / "results.json", {"config": config, "runs": runs,
                                      "plots": [p.name for p in plots]})
    say(f"\nwrote {out / 'results.json'} and {', '.join(p.name for p in plots) or 'no plots'}")
    return 0
