"""``natgrad analyze``: matrix-free Fisher analysis of a fresh or trained model.

Computes the exact trace, the top-k eigenpairs (Lanczos, with residuals), the SLQ spectral
density, log det and effective dimension, per-layer blocks, and how well K-FAC (and projected
K-FAC) approximate the Fisher. Writes ``report.json`` and PNG plots to ``--out``.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path
from typing import Any

import torch

from ..data import DATASETS, DataError, load_dataset
from ..models import MODELS, build_model, get_model_spec, load_checkpoint
from ..models.registry import check_model_args
from ..progress import progress_bar
from ..report import format_table, optional_figures, write_json
from .common import UsageError

STAGES = ["trace", "top_k", "density", "kfac", "approximation", "layers"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``analyze`` on the top-level parser."""
    p = subparsers.add_parser("analyze", help="matrix-free Fisher analysis of a model",
                              description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", choices=list(MODELS), help="fresh model (default cnn)")
    src.add_argument("--checkpoint", metavar="PATH",
                     help="a model saved by `natgrad compare --save-model`")
    p.add_argument("--data", default=None, metavar="NAME",
                   help=f"data set: {', '.join(DATASETS)} (default mnist5k or the checkpoint's)")
    p.add_argument("--data-dir", metavar="DIR", help="directory with the data files")
    p.add_argument("--samples", type=int, default=1000, help="training samples N (default 1000)")
    p.add_argument("--fisher", default="exact", choices=["exact", "mc", "empirical"],
                   help="exact type-2 (default), mc (1 sampled label) or empirical (not a Fisher)")
    p.add_argument("-k", "--top-k", type=int, default=10, help="top eigenpairs (default 10)")
    p.add_argument("--density", action=argparse.BooleanOptionalAction, default=True,
                   help="SLQ density, log det and effective dimension (default on)")
    p.add_argument("--probes", type=int, default=4,
                   help="random probes for SLQ and approximation errors (default 4)")
    p.add_argument("--slq-steps", type=int, default=40, help="Lanczos steps per SLQ probe")
    p.add_argument("--damping", type=float, default=1e-3,
                   help="λ for log det(F+λI), effective dimension and condition (default 1e-3)")
    p.add_argument("--tol", type=float, default=1e-3,
                   help="relative residual target of the eigenpairs (default 1e-3)")
    p.add_argument("--rank", type=int, default=32, help="rank of projected K-FAC (default 32)")
    p.add_argument("--out", default="runs/analyze", metavar="DIR",
                   help="output directory (default runs/analyze)")
    p.add_argument("--threads", type=int,
                   help="torch.set_num_threads (use 1 on a busy machine: multi-threaded kernels "
                        "stall when the cores are oversubscribed)")
    p.add_argument("--cache-mb", type=int, default=1024, metavar="MB",
                   help="memory for the cached forward passes of the Fisher products (default "
                        "1024; chunks beyond it are recomputed, 0 disables the cache)")
    p.add_argument("--seed", type=int, default=0, help="initial weights and probes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _validate(args: argparse.Namespace) -> None:
    for flag, value in (("--samples", args.samples), ("--top-k", args.top_k),
                        ("--probes", args.probes), ("--slq-steps", args.slq_steps),
                        ("--rank", args.rank), ("--threads", args.threads)):
        if value is not None and value <= 0:
            raise UsageError(f"{flag} must be a positive integer, got {value}")
    if args.cache_mb < 0:
        raise UsageError(f"--cache-mb must be non-negative, got {args.cache_mb}")
    if args.probes < 2 and args.density:
        raise UsageError("--probes must be at least 2 for standard errors")
    if not args.damping > 0:
        raise UsageError(f"--damping must be positive, got {args.damping}")
    if not 0 < args.tol < 1:
        raise UsageError(f"--tol must be in (0, 1), got {args.tol}")
    if args.data is not None and args.data not in DATASETS:
        raise UsageError(f"unknown data set {args.data!r}; accepted: {', '.join(DATASETS)}")
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise UsageError(f"--checkpoint {args.checkpoint}: no such file")


def _model(args: argparse.Namespace) -> tuple[torch.nn.Module, str, str]:
    """``(model, model name, data set name)``."""
    if args.checkpoint is not None:
        try:
            model, ckpt = load_checkpoint(args.checkpoint)
        except Exception as exc:  # a torch.load / state_dict failure: one line
            raise UsageError(f"--checkpoint {args.checkpoint}: cannot load ({exc})"
                             .splitlines()[0]) from None
        data = args.data or ckpt["dataset"]
        if data != ckpt["dataset"]:
            raise UsageError(f"the checkpoint was trained on {ckpt['dataset']!r}, not {data!r}")
        return model, ckpt["model"], data
    name, data = args.model or "cnn", args.data or "mnist5k"
    try:
        check_model_args(name, DATASETS[data].info, None)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    torch.manual_seed(args.seed)
    return build_model(name, DATASETS[data].info), name, data


def run(args: argparse.Namespace) -> int:
    """Validate, build, analyse, print the per-layer table, write JSON and plots."""
    from ..fisher.analysis import analyze
    from ..fisher.plots import plot_report

    _validate(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, name, data_name = _model(args)
    try:
        train_set, _ = load_dataset(data_name, args.data_dir)
    except DataError as exc:
        raise UsageError(str(exc)) from None
    n = min(args.samples, len(train_set))
    spec = get_model_spec(name)
    X = train_set.x[:n]
    y = X.reshape(n, -1) if spec.reconstruct else train_set.y[:n]
    model.eval()  # explicit: the analysis is of the deterministic (eval-mode) network
    num_params = sum(p.numel() for p in model.parameters())
    print(f"natgrad analyze: {name} ({num_params:,} parameters) on {n} {data_name} samples, "
          f"{args.fisher} Fisher, loss {spec.loss_kind}, {torch.get_num_threads()} threads")

    stages = STAGES if args.density else [s for s in STAGES if s != "density"]
    bar = progress_bar(total=len(stages), disable=args.no_progress, leave=False, dynamic_ncols=True)

    def progress(stage: str) -> None:
        if bar.n < len(stages) and stage != stages[0]:
            bar.update(1)
        bar.set_description(stage)

    t0 = time.perf_counter()
    try:
        report = analyze(model, (X, y), spec.loss_kind, fisher=args.fisher, top_k=args.top_k,
                         density=args.density, probes=args.probes, slq_steps=args.slq_steps,
                         damping=args.damping, tol=args.tol, projected_rank=args.rank,
                         seed=args.seed, cache=args.cache_mb > 0,
                         cache_bytes=args.cache_mb << 20, progress=progress)
    finally:
        bar.update(bar.total - bar.n)
        bar.close()
    wall = time.perf_counter() - t0
    report = {"model": name, "checkpoint": args.checkpoint, "dataset": data_name, **report,
              "wall_time_s": wall, "threads": torch.get_num_threads(),
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    _print(report)
    out = Path(args.out)
    plots = optional_figures(plot_report, report, out)
    report["plots"] = [p.name for p in plots]
    write_json(out / "report.json", report)
    print(f"\nwrote {out / 'report.json'} and {', '.join(p.name for p in plots) or 'no plots'} "
          f"({wall:.1f} s, peak RSS {report['peak_rss_mb']:.0f} MB)")
    return 0


def _print(r: dict[str, Any]) -> None:
    keys = list(r["approximations"])
    headers = ["layer", "kind", "params", "trace", "top_eig", *(f"{k}_rel_err" for k in keys)]
    rows = [[row["name"], row["kind"], row["params"], row["trace"], row["top_eigenvalue"],
             *(row[f"{k}_relative_error"] for k in keys)] for row in r["layers"]]
    print(format_table(headers, rows))
    res = max(r["top_residuals"])
    print(f"\ntrace {r['trace']['value']:.6g} (exact)   top-{len(r['top_eigenvalues'])} "
          f"eigenvalues {', '.join(f'{v:.4g}' for v in r['top_eigenvalues'])} "
          f"(max rel. residual {res:.1e}, converged {r['top_converged']})")
    if r.get("logdet"):
        print(f"log det(F + {r['damping']:g} I) {r['logdet']['value']:.6g} ± "
              f"{r['logdet']['stderr']:.2g}   effective dimension "
              f"{r['effective_dimension']['value']:.4g} ± {r['effective_dimension']['stderr']:.2g}")
    for k, a in r["approximations"].items():
        e = a["relative_error"]
        print(f"{k}: ‖(F − K)v‖/‖Fv‖ = {e['value']:.3g} ± {e['stderr']:.2g}, top-k overlap "
              f"{a['top_k_overlap']:.3f}")
    c = r["coupling"]
    print(f"cross-layer coupling (share of ‖Fv‖² off the diagonal blocks) {c['value']:.3g} ± "
          f"{c['stderr']:.2g}")
