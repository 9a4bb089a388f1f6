"""``natgrad bench``: ``scaling`` (cost of the factor strategies vs width), ``stability``
(float32 K-FAC variants over a damping sweep), ``capacity`` (step time, peak memory and
optimizer state of whole networks vs parameters, under budgets) and ``steps`` (step times of
optimizers taking turns on one model). The measuring code lives in :mod:`natgrad.bench`.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from .common import (
    UsageError,
    check_output_dir,
    config_error,
    describe,
    parse_names,
    parse_widths,
    split_list,
)

DEFAULT_WIDTHS = "256,512,1024,2048,4096"
DEFAULT_RANKS = "32,64"
DEFAULT_DAMPINGS = "1e-1,1e-2,1e-3,1e-4,1e-5,1e-6"
DEFAULT_CAPACITY_WIDTHS = "1024,2048,4096,8192,16384"
DEFAULT_CNN_CHANNELS = "128,256,512"
DEFAULT_CAPACITY_OPTIMIZERS = "sgd,adam,kfac,pkfac,pkfac-every"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``bench`` (``scaling``, ``stability``, ``capacity``, ``steps``) on the top-level
    parser."""
    p = subparsers.add_parser("bench", help="benchmarks: factor cost scaling, capacity, damping "
                              "stability, step times",
                              description=describe(__doc__))
    sub = p.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)

    s = sub.add_parser("scaling", help="update / preconditioning time and memory vs layer width",
                       description="Time curvature updates and preconditioning of one square "
                       "layer for each factor strategy, interleaved; fit log-log slopes.")
    s.add_argument("--widths", default=DEFAULT_WIDTHS, metavar="D1,D2,...",
                   help=f"layer widths (default {DEFAULT_WIDTHS})")
    s.add_argument("--ranks", default=DEFAULT_RANKS, metavar="R1,R2,...",
                   help=f"ranks of the projected strategy (default {DEFAULT_RANKS})")
    s.add_argument("--strategies", metavar="S1,S2,...",
                   help="factor strategies (default: every registered one)")
    s.add_argument("--batch", type=int, default=128, help="rows of the statistics (default 128)")
    s.add_argument("--repeats", type=int, default=5,
                   help="timed repeats, median reported (default 5; 2 for configurations "
                   "slower than 1 s)")
    s.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    s.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    s.add_argument("--out", default="runs/bench", metavar="DIR",
                   help="writes DIR/scaling.json and DIR/scaling.png (default runs/bench)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=run_scaling_cmd)

    t = sub.add_parser("stability", help="divergence of float32 K-FAC variants over dampings",
                       description="Train the MLP on the embedded MNIST sample with kfac, rkfac "
                       "and pkfac over dampings x seeds; count diverged runs.")
    t.add_argument("--optimizers", metavar="A,B,...",
                   help="K-FAC optimizers of the registry (default: kfac,rkfac,pkfac)")
    t.add_argument("--dampings", default=DEFAULT_DAMPINGS, metavar="D1,D2,...",
                   help=f"dampings (default {DEFAULT_DAMPINGS})")
    t.add_argument("--seeds", default="0,1,2", metavar="S1,S2,...", help="seeds (default 0,1,2)")
    t.add_argument("--epochs", type=int, default=1, help="epochs per run (default 1)")
    t.add_argument("--batch-size", type=int, default=128, help="default 128")
    t.add_argument("--lr", type=float, default=0.05, help="learning rate (default 0.05)")
    t.add_argument("--rank", type=int, default=None,
                   help="rank of pkfac's factors (default: the projected strategy's, 24)")
    t.add_argument("--divergence-factor", type=float, default=1.5,
                   help="diverged if final train loss > this x initial (default 1.5)")
    t.add_argument("--limit-train", type=int, metavar="N", help="first N training samples only")
    t.add_argument("--limit-test", type=int, metavar="N", help="first N test samples only")
    t.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    t.add_argument("--out", default="runs/bench", metavar="DIR",
                   help="writes DIR/stability.json (default runs/bench)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=run_stability_cmd)
    _add_capacity(sub)

    from ..models import MODELS
    from ..optim.registry import OPTIMIZERS

    st = sub.add_parser("steps", help="step times of optimizers taking turns on one model",
                        description="Every optimizer trains its own copy of the same model on "
                        "the same batches, one step each per round (rotating order); median step "
                        "times and the median per-round ratio to the first optimizer.")
    st.add_argument("--model", default="resnet8", choices=list(MODELS),
                    help="network (default resnet8)")
    st.add_argument("--hidden", metavar="W1,W2,...",
                    help="widths of a model that takes them (e.g. 16384,16384 for the MLP)")
    st.add_argument("--data", metavar="NAME",
                    help="data set (default mnist5k; majority for the transformer)")
    st.add_argument("--optimizers", default="sgd,adamw,kfac,pkfac,pkfac+adamw",
                    metavar="A,B,...", help=f"from {', '.join(OPTIMIZERS)}; the first is the "
                    "reference of the ratios (default sgd,adamw,kfac,pkfac,pkfac+adamw)")
    st.add_argument("--rounds", type=int, default=60, help="timed rounds (default 60)")
    st.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    st.add_argument("--batch-size", type=int, default=128, help="default 128")
    st.add_argument("--seed", type=int, default=0, help="initial weights, batch order")
    st.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    st.add_argument("--out", default="runs/bench", metavar="DIR",
                    help="writes DIR/steps.json (default runs/bench)")
    st.set_defaults(func=run_steps_cmd)
    return p


def _add_capacity(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("capacity", help="step time, peak memory and state of whole networks vs "
                       "parameters, per optimizer, under time and memory budgets",
                       description="Train MLPs 784-w-w-10 and a wide CNN for a few steps with "
                       "each optimizer, one child process per configuration; record the first "
                       "and median step times, the peak resident memory and the optimizer "
                       "state, and ok / out_of_time / out_of_memory / failed.")
    c.add_argument("--widths", default=DEFAULT_CAPACITY_WIDTHS, metavar="W1,W2,...",
                   help=f"MLP hidden widths (default {DEFAULT_CAPACITY_WIDTHS})")
    c.add_argument("--cnn-channels", default=DEFAULT_CNN_CHANNELS, metavar="C1,C2,...|none",
                   help=f"conv channels of the wide CNN, or 'none' (default "
                   f"{DEFAULT_CNN_CHANNELS})")
    c.add_argument("--optimizers", default=DEFAULT_CAPACITY_OPTIMIZERS, metavar="A,B,...",
                   help="registry optimizers; NAME-every is a K-FAC entry with curvature every "
                   f"step (default {DEFAULT_CAPACITY_OPTIMIZERS})")
    c.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    c.add_argument("--warmup", type=int, default=3,
                   help="untimed steps after the first (default 3)")
    c.add_argument("--batch", type=int, default=128, help="samples per step (default 128)")
    c.add_argument("--time-budget", type=float, default=600.0, metavar="SECONDS",
                   help="seconds of steps per configuration (default 600; the setup has 300 more)")
    c.add_argument("--memory-budget", type=float, default=20.0, metavar="GIB",
                   help="resident memory per configuration, GiB (default 20)")
    c.add_argument("--threads", type=int,
                   help="torch.set_num_threads in each child (default: torch's choice)")
    c.add_argument("--seed", type=int, default=0, help="initial weights, batch order (default 0)")
    c.add_argument("--no-skip", action="store_true",
                   help="also start an optimizer at widths above one where it ran out of time "
                   "or memory")
    c.add_argument("--out", default="runs/bench", metavar="DIR",
                   help="writes DIR/capacity.json and DIR/capacity.png (default runs/bench)")
    c.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.set_defaults(func=run_capacity_cmd)


def _ints(text: str, flag: str, low: int = 1) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in split_list(text))
    except ValueError:
        values = ()
    if not values or any(v < low for v in values):
        raise UsageError(f"{flag} expects integers >= {low} like 1,2,3, got {text!r}")
    if len(set(values)) != len(values):
        raise UsageError(f"{flag}: a value is listed twice in {text!r}")
    return values


def _names(text: str, accepted: tuple[str, ...], flag: str, what: str) -> tuple[str, ...]:
    try:
        return tuple(parse_names(text, accepted, what))
    except UsageError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in split_list(text))
    except ValueError:
        values = ()
    if not values or any(not (math.isfinite(v) and v > 0) for v in values):
        raise UsageError(f"{flag} expects positive numbers like 1e-2,1e-3, got {text!r}")
    return values


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")


def run_scaling_cmd(args: argparse.Namespace) -> int:
    """Validate, measure, print the table, write ``scaling.json`` and ``scaling.png``."""
    from ..bench.scaling import ScalingConfig, format_scaling, run_scaling, strategy_names

    _positive(args, "batch", "repeats", "threads")
    names = strategy_names()
    cfg = ScalingConfig(
        widths=_ints(args.widths, "--widths"),
        ranks=_ints(args.ranks, "--ranks"),
        strategies=tuple(parse_names(args.strategies or ",".join(names), names, "strategy")),
        batch=args.batch,
        repeats=args.repeats,
        dtype=args.dtype,
        threads=args.threads,
    )
    doc = run_scaling(cfg, args.out, progress=not args.no_progress)
    print(format_scaling(doc))
    print(f"\nwrote {Path(args.out) / 'scaling.json'} and scaling.png")
    return 0


def run_stability_cmd(args: argparse.Namespace) -> int:
    """Validate, train every run, print the table, write ``stability.json``."""
    from ..bench.stability import (
        DEFAULT_VARIANTS,
        StabilityConfig,
        format_stability,
        run_stability,
        variants,
    )

    _positive(args, "epochs", "batch_size", "lr", "rank", "divergence_factor", "limit_train",
              "limit_test", "threads")
    if not math.isfinite(args.lr) or not math.isfinite(args.divergence_factor):
        raise UsageError("--lr and --divergence-factor must be finite")
    rank = {} if args.rank is None else {"rank": args.rank}
    cfg = StabilityConfig(
        optimizers=tuple(parse_names(args.optimizers or ",".join(DEFAULT_VARIANTS),
                                     variants(), "optimizer")),
        dampings=_floats(args.dampings, "--dampings"),
        seeds=_ints(args.seeds, "--seeds", low=0),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        divergence_factor=args.divergence_factor,
        limit_train=args.limit_train,
        limit_test=args.limit_test,
        threads=args.threads,
        **rank,
    )
    doc = run_stability(cfg, args.out, progress=not args.no_progress)
    print(format_stability(doc))
    print(f"\nwrote {Path(args.out) / 'stability.json'}")
    return 0


def run_steps_cmd(args: argparse.Namespace) -> int:
    """Validate, measure, print the table, write ``steps.json``."""
    from ..models import default_dataset
    from ..optim.registry import OPTIMIZERS

    _positive(args, "threads")
    names = parse_names(args.optimizers, OPTIMIZERS, "optimizer")
    data = args.data or default_dataset(args.model)
    hidden = None if args.hidden is None else parse_widths(args.hidden)
    check_output_dir(args.out, "--out")

    from ..bench.steps import StepConfig, format_steps, interleaved_step_times
    from ..report import write_json

    try:  # StepConfig checks rounds, warmup, batch size and the optimizer list
        cfg = StepConfig(args.model, data, tuple(names), hidden=hidden, rounds=args.rounds,
                         warmup=args.warmup, batch_size=args.batch_size, seed=args.seed)
    except ValueError as exc:
        raise config_error(exc, StepConfig) from None

    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    doc = interleaved_step_times(cfg)
    print(format_steps(doc))
    path = Path(args.out) / "steps.json"
    write_json(path, doc)
    print(f"\nwrote {path}")
    return 0


def run_capacity_cmd(args: argparse.Namespace) -> int:
    """Validate, run every configuration, print the table (or the JSON), write
    ``capacity.json`` and ``capacity.png``."""
    from ..bench.capacity import CapacityConfig, format_capacity, optimizer_names, run_capacity

    _positive(args, "steps", "batch", "time_budget", "memory_budget", "threads")
    for flag, value in (("--warmup", args.warmup), ("--seed", args.seed)):
        if value < 0:
            raise UsageError(f"{flag} must be >= 0, got {value}")
    for flag, value in (("--time-budget", args.time_budget),
                        ("--memory-budget", args.memory_budget)):
        if not math.isfinite(value):
            raise UsageError(f"{flag} must be a finite number of "
                             f"{'seconds' if 'time' in flag else 'GiB'}, got {value}")
    channels = (None if args.cnn_channels.strip().lower() == "none"
                else _ints(args.cnn_channels, "--cnn-channels"))
    check_output_dir(args.out, "--out")
    cfg = CapacityConfig(
        widths=_ints(args.widths, "--widths"),
        cnn_channels=channels,
        optimizers=_names(args.optimizers, optimizer_names(), "--optimizers", "optimizer"),
        steps=args.steps,
        warmup=args.warmup,
        batch=args.batch,
        time_budget_s=args.time_budget,
        memory_budget_gib=args.memory_budget,
        threads=args.threads,
        seed=args.seed,
        skip_larger=not args.no_skip,
    )
    doc = run_capacity(cfg, args.out, progress=not args.no_progress and not args.json,
                       command=_capacity_command(args))
    if args.json:
        print((Path(args.out) / "capacity.json").read_text(), end="")
    else:
        print(format_capacity(doc))
        print(f"\nwrote {Path(args.out) / 'capacity.json'} and capacity.png")
    return 0


def _capacity_command(args: argparse.Namespace) -> str:
    """The full command line of this run, every setting written out."""
    import shlex

    words = ["natgrad", "bench", "capacity"]
    for flag in ("widths", "cnn_channels", "optimizers", "steps", "warmup", "batch",
                 "time_budget", "memory_budget", "threads", "seed", "out"):
        value = getattr(args, flag)
        if value is not None:
            words += [f"--{flag.replace('_', '-')}", str(value)]
    return shlex.join(words + (["--no-skip"] if args.no_skip else []))
