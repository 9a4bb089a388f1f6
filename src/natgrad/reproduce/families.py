"""Two parts of ``natgrad reproduce`` beyond the MNIST MLP / CNN: whole networks, and training to
convergence with tuned learning rates.

* :func:`run_families` — the ResNet (BatchNorm) on the embedded MNIST sample and the causal
  transformer (Embedding, LayerNorm, attention) on the generated majority task: every optimizer
  of :data:`FAMILY_OPTIMIZERS` at the same epochs and seeds, accuracy, wall time as a ratio to
  SGD, and the fraction of parameters each optimizer preconditions.
* :func:`run_steps` — step times of the CNN, the ResNet and the transformer with the optimizers
  taking turns step by step (:mod:`natgrad.bench.steps`: robust to a drifting load, which
  distorts step times taken from separate training runs on a shared machine).
* :func:`run_convergence` — for the CNN, the ResNet and the transformer: each optimizer's learning
  rate picked from a small grid on a validation split carved from the training data (the test
  set is not looked at), then ``convergence_epochs`` epochs with one cosine schedule for all,
  per seed: final test accuracy and loss, wall time. The equal-epoch tables flatter
  second-order methods; this one gives every optimizer its own learning rate and a schedule.
"""

from __future__ import annotations

from typing import Any

from ..bench.steps import StepConfig, interleaved_step_times
from ..models import default_dataset
from .context import Context
from .training import compare, metric

#: the optimizers of the model-family tables
FAMILY_OPTIMIZERS = ("sgd", "adamw", "kfac", "pkfac", "pkfac+adamw")
#: the optimizers of the convergence runs
CONVERGENCE_OPTIMIZERS = ("sgd", "adamw", "kfac", "pkfac")
#: the learning-rate grid per optimizer, around the registry default. The first, 3-point grid's
#: pick was its largest value for SGD and AdamW on every model, and larger rates won on the ResNet
#: and the transformer (``benchmarks/grid_edge.py``), hence the larger values; the pick is still
#: the largest for some optimizers there (docs/DISCUSSION.md, part 10)
LR_GRID = {"sgd": (0.02, 0.05, 0.1, 0.2, 0.4), "adamw": (3e-4, 1e-3, 3e-3, 1e-2),
           "kfac": (0.03, 0.1, 0.3, 1.0), "pkfac": (0.03, 0.1, 0.3, 1.0)}


def run_families(ctx: Context) -> dict[str, Any]:
    """Equal-epoch comparison on the ResNet and the transformer (a parity-shaped document)."""
    s = ctx.settings
    doc: dict[str, Any] = {"seeds": list(s.seeds), "optimizers": list(FAMILY_OPTIMIZERS),
                           "missing": [], "models": {}}
    for model in s.family_models:
        entry: dict[str, Any] = {"epochs": s.family_epochs, "metric": metric(model),
                                 "data": default_dataset(model), "seed_runs": [], "figures": []}
        doc["models"][model] = entry
        for seed in s.seeds:
            ctx.note(f"{model} seed {seed}")
            out = ctx.work / "families" / f"{model}-seed{seed}"
            res = compare(ctx, model, FAMILY_OPTIMIZERS, s.family_epochs, seed, out,
                          data=default_dataset(model))
            entry["seed_runs"].append({"seed": seed, "config": res["config"],
                                       "runs": res["runs"]})
            entry["num_params"] = res["runs"][0]["num_params"]
            if seed == s.seeds[0]:
                for name in res.get("plots", []):
                    path = ctx.figure(out / name, f"families-{model}-{name}")
                    if path:
                        entry["figures"].append(path)
        entry["preconditioned"] = {r["optimizer"]: r["preconditioned_fraction"]
                                   for r in entry["seed_runs"][0]["runs"]}
    return doc


def run_steps(ctx: Context) -> dict[str, Any]:
    """Interleaved step times per model (:func:`natgrad.bench.steps.interleaved_step_times`)."""
    s = ctx.settings
    doc: dict[str, Any] = {"optimizers": list(FAMILY_OPTIMIZERS), "models": {}}
    for model in s.step_models:
        ctx.note(f"{model}: step times, optimizers taking turns")
        doc["models"][model] = interleaved_step_times(StepConfig(
            model, default_dataset(model), FAMILY_OPTIMIZERS, rounds=s.step_rounds,
            warmup=min(3, s.step_rounds)))
    return doc


def _final(run: dict[str, Any]) -> dict[str, Any]:
    keys = ("optimizer", "test_accuracy", "test_loss", "train_loss", "wall_time_s",
            "step_time_s_median", "lr", "diverged")
    out = {k: run.get(k) for k in keys}
    out["test_loss_by_epoch"] = [r["test_loss"] for r in run["history"]]
    return out


def grid_accuracy(ctx: Context, model: str, optimizer: str, lr: float) -> float:
    """One run of the learning-rate grid: ``grid_epochs`` epochs from seed 0 with the last
    ``validation`` training samples held out and a cosine schedule. Returns the validation
    accuracy, or -1 when the run diverged."""
    s = ctx.settings
    res = compare(ctx, model, [optimizer], s.grid_epochs, 0,
                  ctx.work / "grid" / f"{model}-{optimizer}-{lr:g}", data=default_dataset(model),
                  lrs={optimizer: lr}, validation=s.validation, lr_schedule="cosine")
    run = res["runs"][0]
    return -1.0 if run["diverged"] else run["test_accuracy"]


def run_convergence(ctx: Context) -> dict[str, Any]:
    """Validation-tuned learning rates, a cosine schedule, training to convergence."""
    s = ctx.settings
    doc: dict[str, Any] = {"seeds": list(s.seeds), "optimizers": list(CONVERGENCE_OPTIMIZERS),
                           "epochs": s.convergence_epochs, "grid_epochs": s.grid_epochs,
                           "validation": s.validation, "schedule": "cosine", "models": {}}
    for model in s.convergence_models:
        data = default_dataset(model)
        grid: dict[str, dict[str, float]] = {}
        for opt in CONVERGENCE_OPTIMIZERS:
            scores = {}
            for lr in LR_GRID[opt]:
                ctx.note(f"{model}: {opt} lr {lr:g} on the validation split")
                scores[f"{lr:g}"] = grid_accuracy(ctx, model, opt, lr)
            grid[opt] = scores
        chosen = {o: float(max(g, key=lambda k: g[k])) for o, g in grid.items()}
        entry: dict[str, Any] = {"data": data, "grid_validation_accuracy": grid,
                                 "chosen_lr": chosen, "seed_runs": []}
        for seed in s.seeds:
            ctx.note(f"{model}: {s.convergence_epochs} epochs, seed {seed}")
            res = compare(ctx, model, CONVERGENCE_OPTIMIZERS, s.convergence_epochs, seed,
                          ctx.work / "convergence" / f"{model}-seed{seed}", data=data,
                          lrs=chosen, lr_schedule="cosine")
            entry["seed_runs"].append({"seed": seed, "runs": [_final(r) for r in res["runs"]]})
        doc["models"][model] = entry
    return doc
