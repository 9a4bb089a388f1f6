"""``natgrad analyze``: matrix-free Fisher analysis of a fresh or trained model.

Computes the exact trace, the top-k eigenpairs (with residuals), the spectral density, log det
and effective dimension, per-layer blocks, and how well K-FAC (and projected K-FAC) approximate
the Fisher. When the Fisher's N·R rows are fewer than its parameters (a wide network on a
thousand samples) the spectrum is exact, from the rows' Gram matrix; otherwise Lanczos and SLQ
(--spectrum). Writes ``report.json`` and PNG plots to ``--out``.
"""

from __future__ import annotations

import argparse

from ..data import DATASETS, DataError
from ..models import MODELS
from .common import UsageError, check_output_dir, config_error, describe, parse_widths


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``analyze`` on the top-level parser."""
    p = subparsers.add_parser("analyze", help="matrix-free Fisher analysis of a model",
                              description=describe(__doc__))
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", choices=list(MODELS), help="fresh model (default cnn)")
    src.add_argument("--checkpoint", metavar="PATH",
                     help="a model saved by natgrad compare --save-model")
    p.add_argument("--hidden", metavar="W1,W2,...",
                   help="widths of a fresh model that takes them (MLP hidden layers, "
                   "autoencoder encoder, wide-CNN channels)")
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
    p.add_argument("--rank", type=int, default=None,
                   help="rank of projected K-FAC (default: the projected strategy's, 24)")
    p.add_argument("--out", default="runs/analyze", metavar="DIR",
                   help="output directory (default runs/analyze)")
    p.add_argument("--threads", type=int,
                   help="torch.set_num_threads (use 1 on a busy machine: multi-threaded kernels "
                        "stall when the cores are oversubscribed)")
    p.add_argument("--cache-mb", type=int, default=1024, metavar="MB",
                   help="memory for the cached forward passes of the Fisher products (default "
                        "1024; chunks beyond it are recomputed, 0 disables the cache)")
    p.add_argument("--memory-gb", type=float, default=None, metavar="GB",
                   help="memory budget of the analysis in GiB (default: what the machine has "
                        "free, MemAvailable); the stages are planned under it, the plan is "
                        "printed, and a request that cannot fit fails at once with the plan")
    p.add_argument("--spectrum", default="auto", choices=["auto", "gram", "lanczos"],
                   help="gram: every eigenvalue exactly from the N·R × N·R Gram matrix of the "
                        "Fisher's rows (needs them in --cache-mb); lanczos: products with F "
                        "(top-k Lanczos, SLQ density); auto (default): gram when it is the "
                        "smaller problem and fits")
    p.add_argument("--seed", type=int, default=0, help="initial weights and probes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Validate, then run the analysis (table on stdout, JSON and plots in ``--out``)."""
    from ..experiments import ExperimentError
    from ..experiments.analyze import STAGES, AnalyzeConfig, run_analyze
    from ..progress import progress_bar

    check_output_dir(args.out, "--out")
    kw = {} if args.rank is None else {"rank": args.rank}
    if args.hidden is not None:
        if args.checkpoint is not None:
            raise UsageError("--hidden is for a fresh --model, not a --checkpoint")
        kw["hidden"] = parse_widths(args.hidden)
    try:
        cfg = AnalyzeConfig(model=args.model, checkpoint=args.checkpoint, data=args.data,
                            data_dir=args.data_dir, samples=args.samples, fisher=args.fisher,
                            top_k=args.top_k, density=args.density, probes=args.probes,
                            slq_steps=args.slq_steps, damping=args.damping, tol=args.tol,
                            cache_mb=args.cache_mb, memory_gb=args.memory_gb,
                            spectrum=args.spectrum,
                            threads=args.threads, seed=args.seed,
                            out=args.out, **kw)
    except ValueError as exc:
        raise config_error(exc, AnalyzeConfig) from None
    stages = STAGES if args.density else tuple(s for s in STAGES if s != "density")
    bar = progress_bar(total=len(stages), disable=args.no_progress, leave=False,
                       dynamic_ncols=True)

    def progress(stage: str) -> None:
        if bar.n < len(stages) and stage != stages[0]:
            bar.update(1)
        bar.set_description(stage)

    try:
        run_analyze(cfg, progress=progress)
    except (DataError, ExperimentError) as exc:
        raise UsageError(str(exc)) from None
    finally:
        bar.update(bar.total - bar.n)
        bar.close()
    return 0
