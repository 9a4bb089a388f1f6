"""Was the convergence part's learning-rate grid wide enough?

``natgrad reproduce`` part 10 picks each optimizer's learning rate from
:data:`natgrad.reproduce.families.LR_GRID` by validation accuracy. When the pick is the largest
value of the grid, the optimum may lie beyond it and the optimizer is under-tuned. This script
runs the grid's own protocol (:func:`natgrad.reproduce.families.grid_accuracy`: same epochs,
validation split, cosine schedule, seed 0) at larger
learning rates and prints them next to the grid's values, so one can see whether the edge pick
was the best.

Usage::

    python benchmarks/grid_edge.py [--models cnn,resnet8,transformer]
                                   [--extra sgd=0.2,0.4 --extra adamw=0.01] [--threads 2]
                                   [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from natgrad.reproduce.context import Context
from natgrad.reproduce.families import LR_GRID, grid_accuracy
from natgrad.reproduce.settings import FULL


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="cnn,resnet8,transformer")
    ap.add_argument("--extra", action="append", default=None,
                    help="OPTIMIZER=LR1,LR2 (repeatable; default sgd=0.2,0.4 and adamw=0.01)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    extra: dict[str, list[float]] = {}
    for item in a.extra or ["sgd=0.2,0.4", "adamw=0.01"]:
        name, _, lrs = item.partition("=")
        if name not in LR_GRID or not lrs:
            raise SystemExit(f"--extra: expected OPTIMIZER=LR,... with OPTIMIZER one of "
                             f"{', '.join(LR_GRID)}, got {item!r}")
        extra[name] = [float(v) for v in lrs.split(",")]
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    doc: dict[str, Any] = {"grid_epochs": FULL.grid_epochs, "validation": FULL.validation,
                           "models": {}}
    with tempfile.TemporaryDirectory(prefix="natgrad-grid-edge-") as work:
        ctx = Context(settings=FULL, out=Path(work), work=Path(work))  # the runs' scratch and log
        for model in a.models.split(","):
            doc["models"][model] = {}
            for opt, lrs in extra.items():
                scores = {f"{lr:g}": grid_accuracy(ctx, model, opt, lr) for lr in lrs}
                doc["models"][model][opt] = scores
                print(f"{model} {opt} (grid {', '.join(f'{v:g}' for v in LR_GRID[opt])}): "
                      + ", ".join(f"lr {k}: {100 * v:.1f} %" for k, v in scores.items()),
                      flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
