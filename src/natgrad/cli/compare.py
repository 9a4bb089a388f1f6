"""``natgrad compare``: train one model with several optimizers from the same start and compare.

The experiment itself is :func:`natgrad.experiments.compare.run_compare`; this module turns the
flags into its :class:`~natgrad.experiments.compare.CompareConfig`, checking every argument (and
that the output paths are writable) before any training. See the README for the JSON contract.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data import DATASETS, DataError
from ..models import MODELS, default_dataset
from ..optim.registry import OPTIMIZERS
from .common import (
    UsageError,
    check_output_dir,
    config_error,
    describe,
    parse_lrs,
    parse_names,
    parse_widths,
)

DEFAULT_OPTIMIZERS = "sgd,adam,kfac,pkfac"
DEFAULT_EPOCHS = 10


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``compare`` on the top-level parser."""
    p = subparsers.add_parser(
        "compare",
        help="train a model with several optimizers and compare time and accuracy",
        description=describe(__doc__),
    )
    p.add_argument("--model", default="mlp", choices=list(MODELS), help="network (default mlp)")
    p.add_argument(
        "--hidden", metavar="W1,W2,...",
        help="widths: MLP hidden layers (default 256,128); autoencoder encoder (1000,500,250,30)",
    )
    p.add_argument(
        "--data", metavar="NAME",
        help=f"data set: {', '.join(DATASETS)} (default mnist5k, embedded; majority, "
        "generated, for the transformer)",
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


def validate(args: argparse.Namespace):  # -> CompareConfig
    """Check every argument before any work (the flags here, the values by the experiment's
    :class:`~natgrad.experiments.compare.CompareConfig`); raises :class:`UsageError` with one
    line."""
    from ..experiments.compare import CompareConfig

    names = parse_names(args.optimizers, OPTIMIZERS, "optimizer")
    lrs = parse_lrs(args.lr, names)
    hidden = parse_widths(args.hidden) if args.hidden is not None else None
    if args.data is None:
        args.data = default_dataset(args.model)
    try:
        cfg = CompareConfig(
            model=args.model, hidden=hidden, data=args.data, data_dir=args.data_dir,
            download=args.download, normalize=args.normalize, optimizers=tuple(names),
            epochs=args.epochs, batch_size=args.batch_size, lrs=lrs, seed=args.seed,
            threads=args.threads, device=args.device, target_accuracy=args.target_accuracy,
            save_model=args.save_model, track_curvature=args.track_curvature, out=args.out,
            limit_train=args.limit_train, limit_test=args.limit_test,
            progress=not args.no_progress)
    except ValueError as exc:
        raise config_error(exc, CompareConfig) from None
    spec = DATASETS[args.data]
    if spec.needs_root:
        files = ", ".join(spec.files)
        if args.data_dir is None:
            raise UsageError(f"--data {args.data} needs --data-dir DIR containing {files}")
        if not args.download and not Path(args.data_dir).is_dir():
            raise UsageError(f"--data-dir {args.data_dir}: no such directory (expected {files})")
    check_output_dir(args.out, "--out")
    if args.save_model is not None:
        check_output_dir(Path(args.save_model).parent, "--save-model")
    return cfg


def run(args: argparse.Namespace) -> int:
    """Validate, then run the experiment (tables on stdout, JSON and plots in ``--out``)."""
    from ..experiments.compare import run_compare

    cfg = validate(args)
    try:
        run_compare(cfg)
    except DataError as exc:
        raise UsageError(str(exc)) from None
    return 0
