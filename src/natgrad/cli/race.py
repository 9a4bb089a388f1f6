"""``natgrad race``: time to result, AlgoPerf-style — natgrad's K-FAC against AdamW, Muon, SOAP,
Shampoo (PSGD-Kron on request). Every optimizer gets the same tuning budget (a fixed number of short
trials over its own key hyperparameters, scored on a validation split), then races at its pick
over several seeds, the optimizers taking turns step by step; reported: steps and own wall time
to a target validation loss (default: what tuned AdamW reaches), final validation and test loss,
ratios to AdamW over seeds, how often natgrad's KL-clip bound. The logic is in
:mod:`natgrad.bench.race`.
"""

from __future__ import annotations

import argparse
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

#: kron (PSGD-Kron) is raced only on request: pytorch-optimizer 4.1's first Kron step on the
#: default GPT did not finish in 100 s on the 2-core development machine
DEFAULT_OPTIMIZERS = "adamw,muon,soap,shampoo,pkfac,pkfac+adamw"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``race`` on the top-level parser."""
    from ..models import MODELS

    p = subparsers.add_parser("race", help="time to a target loss against the optimizers "
                              "people use (equal tuning budget, turns step by step)",
                              description=describe(__doc__))
    p.add_argument("--model", default="gpt", choices=list(MODELS),
                   help="registry model (default gpt; resnet8 for the image race)")
    p.add_argument("--data", help="data set (default: the model's)")
    p.add_argument("--hidden", metavar="W1,W2,...",
                   help="model widths (gpt: width,depth,heads; default: the model's)")
    p.add_argument("--context", type=int, default=64,
                   help="characters per sample on shakespeare_char (default 64)")
    p.add_argument("--optimizers", default=DEFAULT_OPTIMIZERS, metavar="O1,O2,...",
                   help=f"registry names (default {DEFAULT_OPTIMIZERS}; muon needs hidden "
                   "nn.Linear layers, soap/shampoo/kron need natgrad[peers])")
    p.add_argument("--steps", type=int, default=2000, help="steps per raced run (default 2000)")
    p.add_argument("--batch", type=int, default=32, help="samples per step (default 32)")
    p.add_argument("--trials", type=int, default=8,
                   help="tuning trials per optimizer, the default setting first (default 8)")
    p.add_argument("--tune-steps", type=int, default=300,
                   help="steps of each tuning trial (default 300)")
    p.add_argument("--seeds", default="0,1,2", metavar="S1,S2,...",
                   help="seeds of the raced runs (default 0,1,2)")
    p.add_argument("--eval-every", type=int, default=50,
                   help="steps between validation evaluations (default 50)")
    p.add_argument("--eval-samples", type=int, default=512,
                   help="validation samples per evaluation (default 512)")
    p.add_argument("--final-samples", type=int,
                   help="validation / test samples of the final losses (default: all)")
    p.add_argument("--target", type=float,
                   help="target validation loss (default: tuned AdamW's last one)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny GPT, a few steps: seconds (checks the pipeline, measures "
                   "nothing); other options are ignored except --out and --optimizers")
    p.add_argument("--out", default="runs/race", metavar="DIR",
                   help="writes DIR/race.json and DIR/race.png (default runs/race)")
    p.add_argument("--quiet", action="store_true", help="no per-trial lines")
    p.set_defaults(func=run_race_cmd)
    return p


def _config(args: argparse.Namespace):  # -> RaceConfig (imports torch)
    from ..bench.race import SMOKE, RaceConfig
    from ..optim.registry import OPTIMIZERS

    names = tuple(parse_names(args.optimizers, OPTIMIZERS, "optimizer"))
    if args.smoke:
        if args.optimizers == DEFAULT_OPTIMIZERS:
            return SMOKE
        return RaceConfig(**{**SMOKE.__dict__, "optimizers": names})
    try:
        seeds = tuple(int(s) for s in split_list(args.seeds))
    except ValueError:
        raise UsageError(f"--seeds must be a comma list of integers, got {args.seeds!r}"
                         ) from None
    hidden = None if args.hidden is None else parse_widths(args.hidden)
    try:
        return RaceConfig(model=args.model, hidden=hidden, data=args.data, context=args.context,
                          optimizers=names, steps=args.steps, batch=args.batch,
                          trials=args.trials, tune_steps=args.tune_steps, seeds=seeds,
                          eval_every=args.eval_every, eval_samples=args.eval_samples,
                          final_samples=args.final_samples, target=args.target,
                          threads=args.threads)
    except ValueError as exc:
        raise config_error(exc, RaceConfig) from None


def run_race_cmd(args: argparse.Namespace) -> int:
    """Validate, tune, race, print the table, write ``race.json`` and ``race.png``."""
    import sys

    check_output_dir(args.out, "--out")
    cfg = _config(args)
    from ..bench.race import format_race, run_race

    def log(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    command = "natgrad race " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "natgrad race"
    doc = run_race(cfg, args.out, log=log, command=command)
    print(format_race(doc))
    print(f"\nwrote {Path(args.out) / 'race.json'}"
          + "".join(f", {f}" for f in doc.get("figures", [])))
    return 0
