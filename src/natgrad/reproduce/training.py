"""The training parts of ``natgrad reproduce``: accuracy parity and step / wall time.

Both run :func:`natgrad.experiments.compare.run_compare` (what ``natgrad compare`` runs) or the
training loop directly, in this process, and return JSON-ready documents.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from ..models import get_model_spec
from .context import Context, available_optimizers
from .settings import MODELS


def compare(ctx: Context, model: str, optimizers: Sequence[str], epochs: int, seed: int,
            out: Path, **options: Any) -> dict[str, Any]:
    """:func:`~natgrad.experiments.compare.run_compare` for one model and seed (with this mode's
    widths and sample limits, overridden by ``options``: any
    :class:`~natgrad.experiments.compare.CompareConfig` field); its output goes to the log.
    Returns the ``results.json`` document."""
    from ..experiments.compare import CompareConfig, run_compare

    s = ctx.settings
    hidden = s.hidden.get(model)
    kwargs: dict[str, Any] = {
        "hidden": tuple(int(w) for w in hidden.split(",")) if hidden else None,
        "limit_train": s.limit_train.get(model), "limit_test": s.limit_test.get(model),
        **options}
    cfg = CompareConfig(model=model, optimizers=tuple(optimizers), epochs=epochs, seed=seed,
                        out=out, progress=False, **kwargs)
    ctx.log(f"$ compare {model} {','.join(optimizers)} epochs={epochs} seed={seed}")
    return run_compare(cfg, say=ctx.log)


def metric(model: str) -> str:
    return "test_loss" if get_model_spec(model).reconstruct else "test_accuracy"


def run_parity(ctx: Context) -> dict[str, Any]:
    """Every registered optimizer of :data:`PARITY_OPTIMIZERS` on each model, once per seed."""
    s = ctx.settings
    opts, missing = available_optimizers()
    doc: dict[str, Any] = {"seeds": list(s.seeds), "optimizers": opts, "missing": missing,
                           "models": {}}
    total, done = len(MODELS) * len(s.seeds), 0
    for model in MODELS:
        entry: dict[str, Any] = {"epochs": s.epochs[model], "metric": metric(model),
                                 "seed_runs": [], "figures": []}
        doc["models"][model] = entry
        for seed in s.seeds:
            done += 1
            ctx.note(f"{model} seed {seed} ({done}/{total})")
            out = ctx.work / "parity" / f"{model}-seed{seed}"
            res = compare(ctx, model, opts, s.epochs[model], seed, out)
            entry["seed_runs"].append({"seed": seed, "config": res["config"], "runs": res["runs"]})
            if seed == s.seeds[0]:
                for name in res.get("plots", []):
                    path = ctx.figure(out / name, f"parity-{model}-{name}")
                    if path:
                        entry["figures"].append(path)
    ctx.shared["parity"] = doc
    return doc


#: (label, registry name, optimizer options) of the wide-MLP step-time comparison
WIDE_VARIANTS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("sgd", "sgd", {}),
    ("kfac", "kfac", {}),
    ("kfac, inverse every step", "kfac", {"curvature_every": 1, "inverse_every": 1}),
    ("pkfac", "pkfac", {}),
    ("pkfac, curvature every step", "pkfac", {"curvature_every": 1, "inverse_every": 1}),
)


def _slim(run: dict[str, Any]) -> dict[str, Any]:
    keys = ("optimizer", "test_accuracy", "test_loss", "wall_time_s", "step_time_s_median",
            "time_to_target_s", "epochs", "steps", "diverged")
    return {k: run.get(k) for k in keys}


def run_wide(ctx: Context, seed: int) -> dict[str, Any]:
    """One epoch of the wide MLP per variant, from the same initial weights, in this process;
    the variants take turns ``wide_repeats`` times so that machine noise hits all of them alike.
    """
    from ..data import load_dataset
    from ..experiments.train import TrainConfig, train
    from ..models import build_model
    from ..optim.registry import make_optimizer
    from .markdown import num

    s = ctx.settings
    names = list(dict.fromkeys(name for _, name, _ in WIDE_VARIANTS))
    avail, missing = available_optimizers(names)
    train_set, test_set = load_dataset("mnist5k")
    if s.wide_limit_train:
        train_set = train_set.subset(s.wide_limit_train)
    hidden = tuple(int(w) for w in s.wide_hidden.split(","))
    torch.manual_seed(seed)
    initial = build_model("mlp", train_set.info, hidden)
    train_data = TensorDataset(train_set.x, train_set.y)
    test_data = TensorDataset(test_set.x, test_set.y)
    batch = 128
    variants = [v for v in WIDE_VARIANTS if v[1] in avail]
    runs: dict[str, dict[str, Any]] = {}
    for repeat in range(s.wide_repeats):
        for label, name, options in variants:
            ctx.note(f"wide MLP: {label} ({repeat + 1}/{s.wide_repeats})")
            model = copy.deepcopy(initial)
            opt = make_optimizer(name, model, loss_kind="cross_entropy", **options)
            res = train(model, opt, train_data, test_data, "cross_entropy",
                        TrainConfig(epochs=1, batch_size=batch, seed=seed, target_accuracy=None,
                                    progress=False))
            run = runs.setdefault(label, {
                "label": label, "optimizer": name,
                "options": ", ".join(f"{k}={num(v)}" for k, v in options.items())
                or "registry defaults",
                "step_time_s_runs": [], "wall_time_s": res.wall_time_s,
                "test_accuracy": res.final.get("test_accuracy"),
                "steps": len(res.step_times_s), "diverged": res.diverged})
            run["step_time_s_runs"].append(res.step_time_s_median)
    for run in runs.values():
        run["step_time_s_median"] = statistics.median(run["step_time_s_runs"])
    out = list(runs.values())
    return {"hidden": s.wide_hidden, "batch_size": batch, "seed": seed,
            "steps": out[0]["steps"] if out else 0, "train_size": len(train_set),
            "repeats": s.wide_repeats, "runs": out, "missing": missing}


def run_timing(ctx: Context) -> dict[str, Any]:
    """Ratios to SGD per model (from the parity runs of this invocation, else one seed of fresh
    compare runs) and the wide-MLP step-time comparison."""
    from .markdown import timing_ratios

    s = ctx.settings
    parity = ctx.shared.get("parity")
    doc: dict[str, Any] = {"target_accuracy": 0.9, "models": {}}
    if parity is not None:
        doc["source"] = "the parity runs above"
        for model, m in parity["models"].items():
            doc["models"][model] = {"metric": m["metric"], "error": m.get("error"),
                                    "seed_runs": [{"seed": r["seed"],
                                                   "runs": [_slim(x) for x in r["runs"]]}
                                                  for r in m["seed_runs"]]}
    else:
        opts, _ = available_optimizers()
        seed = s.seeds[0]
        doc["source"] = f"fresh compare runs, seed {seed}"
        for model in MODELS:
            ctx.note(f"{model} seed {seed}")
            res = compare(ctx, model, opts, s.epochs[model], seed, ctx.work / "timing" / model)
            doc["models"][model] = {"metric": metric(model), "seed_runs": [
                {"seed": seed, "runs": [_slim(x) for x in res["runs"]]}]}
    for entry in doc["models"].values():
        entry["ratios"] = timing_ratios(entry["seed_runs"])
    doc["wide"] = run_wide(ctx, s.seeds[0])
    return doc
