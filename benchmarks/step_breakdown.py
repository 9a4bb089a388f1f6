"""Where one training step's time goes: SGD against pkfac on the 784-1024-1024-10 MLP.

The table in docs/DISCUSSION.md (part 2) comes from this script. It trains each variant on the
embedded MNIST sample (batch 128, the same batches for all) and reports medians over the measured
steps of

* the forward pass (for pkfac on curvature steps this includes the statistics hooks) and the
  backward pass (which then includes the Monte-Carlo pull-back to the layer outputs),
* inside ``optimizer.step()``: the squared norms of the gradients and of the curvature statistics
  (finiteness checks, KL-clip and tracked traces), the factor updates,
  the natural-gradient solves and the in-place update of the weights,
* the whole step (forward + backward + ``optimizer.step()``).

The parts inside ``step()`` are timed by wrapping the library functions that do them, so they add
a few microseconds of wrapper overhead each. Usage::

    python benchmarks/step_breakdown.py [--steps 60] [--threads 2] [--hidden 1024,1024]
                                        [--json out.json]

With narrow hidden layers (e.g. ``--hidden 192,192``) the products shrink and the table shows the
cost that does not scale with the hidden width: dispatch, Python, small kernels, and the batched
refresh, which pads every projected factor to the widest one (the first layer's 785 inputs).
``benchmarks/every_step_floor.py`` prices the every-step arithmetic without the library around it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import natgrad.curvature.engine as engine_module
import natgrad.factors.kronecker as kronecker
import natgrad.optim.kfac as kfac_module
from natgrad.data import load_dataset
from natgrad.models import build_model
from natgrad.optim import make_optimizer
from natgrad.report import format_table

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "sgd": ("sgd", {}),
    "pkfac, defaults": ("pkfac", {}),
    "pkfac, curvature every step": ("pkfac", {"curvature_every": 1, "inverse_every": 1}),
}
PARTS = ("forward", "backward", "norms", "factor updates", "solves", "in-place update",
         "optimizer step", "whole step")


class Timers:
    """Per-step sums of named wall times."""

    def __init__(self) -> None:
        self.current: dict[str, float] = {}
        self.steps: list[dict[str, float]] = []

    def add(self, name: str, seconds: float) -> None:
        self.current[name] = self.current.get(name, 0.0) + seconds

    def wrap(self, owner: Any, attr: str, name: str) -> Callable[[], None]:
        """Time every call of ``owner.attr`` under ``name``; returns the undo function."""
        original = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - t0)

        setattr(owner, attr, timed)
        return lambda: setattr(owner, attr, original)

    def next_step(self) -> None:
        self.steps.append(self.current)
        self.current = {}

    def medians(self) -> dict[str, float]:
        return {p: statistics.median(s.get(p, 0.0) for s in self.steps) for p in PARTS}


def measure(
    name: str, options: dict[str, Any], steps: int, hidden: tuple[int, ...] = (1024, 1024),
    warmup: int = 12,
) -> dict[str, float]:
    train_set, _ = load_dataset("mnist5k")
    x_all, y_all = train_set.x, train_set.y
    torch.manual_seed(0)
    model = build_model("mlp", train_set.info, hidden)
    opt = make_optimizer(name, model, loss_kind="cross_entropy", **options)
    timers = Timers()
    undo = [
        timers.wrap(kfac_module, "squared_norms", "norms"),
        timers.wrap(kfac_module, "finite_total", "norms"),
        timers.wrap(engine_module, "squared_norms", "norms"),
        timers.wrap(engine_module, "to_floats", "norms"),
        timers.wrap(kronecker, "_spectral_solve", "solves"),
        timers.wrap(kronecker.Direction, "add_to_", "in-place update"),
    ]
    if hasattr(opt, "distributed"):
        undo.append(timers.wrap(opt.distributed, "update", "factor updates"))
    n = x_all.shape[0] // 128 * 128
    try:
        for i in range(warmup + steps):
            idx = torch.arange((i * 128) % n, (i * 128) % n + 128)
            x, y = x_all[idx], y_all[idx]
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            t1 = time.perf_counter()
            opt.zero_grad()
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            t3 = time.perf_counter()
            for part, sec in (("forward", t1 - t0), ("backward", t2 - t1),
                              ("optimizer step", t3 - t2), ("whole step", t3 - t0)):
                timers.add(part, sec)
            if i < warmup:
                timers.current = {}
            else:
                timers.next_step()
    finally:
        for u in undo:
            u()
    return timers.medians()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="measured steps (default 60)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--hidden", default="1024,1024",
                        help="hidden widths of the MLP (default 1024,1024)")
    parser.add_argument("--json", help="also write the medians (seconds) to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hidden = tuple(int(w) for w in args.hidden.split(","))
    results = {label: measure(name, opts, args.steps, hidden) for label, (name, opts) in
               VARIANTS.items()}
    rows = [[part] + [f"{1e3 * results[v][part]:.2f}" for v in VARIANTS] for part in PARTS]
    print(f"MLP 784-{'-'.join(map(str, hidden))}-10, batch 128: median ms per step over "
          f"{args.steps} steps, {args.threads} threads, torch {torch.__version__}")
    print(format_table(["part", *VARIANTS], rows))
    base = results["sgd"]["whole step"]
    print("whole step / SGD: " + ", ".join(
        f"{v} {results[v]['whole step'] / base:.2f}x" for v in VARIANTS))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"steps": args.steps, "threads": args.threads, "hidden": list(hidden),
                       "median_s": results}, fh, indent=2)


if __name__ == "__main__":
    main()
