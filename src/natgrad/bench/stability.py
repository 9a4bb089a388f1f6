"""Numerical stability of K-FAC variants in float32 over a damping sweep.

Each run trains the MLP on the embedded MNIST sample (``mnist5k``) from the seed's initial weights
with ``natgrad.KFAC(model, factors=…, damping=δ)``: ``kfac`` (dense ``eigh`` factors), ``rkfac``
(``recursive``: Woodbury-updated inverses) and ``pkfac`` (``projected``: rank-``r`` subspaces).
A run *diverged* when its training loss became NaN/Inf, when a parameter became non-finite, or
when the final training loss (evaluated on the whole training set after training) exceeds
``divergence_factor`` × the initial one.
"""

from __future__ import annotations

import copy
import math
import platform
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from ..data import load_dataset
from ..experiments.train import TrainConfig, evaluate, train
from ..factors import ProjectedOptions, get_strategy
from ..models import build_model
from ..optim.kfac import KFAC
from ..optim.registry import OPTIMIZERS
from ..progress import progress_bar
from ..report import format_table, write_json

DEFAULT_VARIANTS = ("kfac", "rkfac", "pkfac")
DEFAULT_DAMPINGS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


def variants() -> dict[str, str]:
    """Optimizer name → factor strategy, for every K-FAC optimizer of the registry."""
    return {name: spec.strategy for name, spec in OPTIMIZERS.items() if spec.strategy}


@dataclass
class StabilityConfig:
    """Settings of :func:`run_stability`.

    Attributes:
        optimizers: K-FAC optimizer names of the registry (:func:`variants`).
        dampings: Tikhonov dampings λ.
        seeds: seeds (initial weights and batch order).
        epochs: epochs per run.
        batch_size: samples per step.
        lr: learning rate.
        rank: rank of the projected factors.
        hidden: MLP hidden widths.
        divergence_factor: final / initial training loss above which a run counts as diverged.
        limit_train, limit_test: use only the first N samples (quick checks).
        threads: ``torch.set_num_threads`` (``None``: leave as is).
    """

    optimizers: tuple[str, ...] = DEFAULT_VARIANTS
    dampings: tuple[float, ...] = DEFAULT_DAMPINGS
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 1
    batch_size: int = 128
    lr: float = 0.05
    rank: int = ProjectedOptions.rank
    hidden: tuple[int, ...] = (256, 128)
    divergence_factor: float = 1.5
    limit_train: int | None = None
    limit_test: int | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        known = variants()
        for name in self.optimizers:
            if name not in known:
                raise ValueError(f"unknown optimizer {name!r}; accepted: {', '.join(known)}")
        if not self.optimizers or not self.dampings or not self.seeds:
            raise ValueError("optimizers, dampings and seeds must not be empty")
        if any(not (math.isfinite(d) and d > 0) for d in self.dampings):
            raise ValueError(f"dampings must be finite numbers > 0, got {self.dampings}")
        for name in ("epochs", "batch_size", "rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not self.divergence_factor > 0:
            raise ValueError(f"divergence_factor must be > 0, got {self.divergence_factor}")
        for name in ("limit_train", "limit_test", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def run_stability(cfg: StabilityConfig, out: str | Path | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Train every (optimizer, damping, seed); write ``stability.json`` under ``out``."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    train_set, test_set = load_dataset("mnist5k")
    if cfg.limit_train is not None:
        train_set = train_set.subset(cfg.limit_train)
    if cfg.limit_test is not None:
        test_set = test_set.subset(cfg.limit_test)
    info = train_set.info
    train_data = TensorDataset(train_set.x, train_set.y)
    test_data = TensorDataset(test_set.x, test_set.y)
    results = []
    runs = [(o, d, s) for s in cfg.seeds for d in cfg.dampings for o in cfg.optimizers]
    bar = progress_bar(runs, desc="bench stability", disable=not progress, leave=False,
               dynamic_ncols=True)
    initial: dict[int, tuple[torch.nn.Module, float]] = {}
    for name, damping, seed in bar:
        bar.set_postfix_str(f"{name} damping={damping:g} seed={seed}")
        if seed not in initial:
            torch.manual_seed(seed)
            model0 = build_model("mlp", info, cfg.hidden).float()
            loss0, _ = evaluate(model0, train_data, "cross_entropy")
            initial[seed] = (model0, loss0)
        model0, loss0 = initial[seed]
        model = copy.deepcopy(model0)
        strategy = variants()[name]
        takes_rank = "rank" in get_strategy(strategy).Options.names()
        options = {"rank": cfg.rank} if takes_rank else {}
        opt = KFAC(model, lr=cfg.lr, factors=strategy, damping=damping,
                   factor_options=options, factor_dtype=torch.float32, seed=seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = train(model, opt, train_data, test_data, "cross_entropy",
                           TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, seed=seed,
                                       target_accuracy=None, progress=False))
        params_ok = all(bool(torch.isfinite(p).all()) for p in model.parameters())
        final_loss, _ = evaluate(model, train_data, "cross_entropy") if params_ok else (
            float("nan"), None)
        test_acc = result.final.get("test_accuracy") if params_ok else None
        diverged = (result.diverged or not params_ok or not _finite(final_loss)
                    or final_loss > cfg.divergence_factor * loss0)
        results.append({
            "optimizer": name,
            "factors": strategy,
            "damping": damping,
            "seed": seed,
            "diverged": bool(diverged),
            "initial_train_loss": loss0,
            "final_train_loss": final_loss,
            "test_accuracy": test_acc,
            "failed_refreshes": opt.failed_refreshes,
            "skipped_steps": opt.skipped_steps,
            "warnings": len(caught),
            "wall_time_s": result.wall_time_s,
        })
    doc = {
        "config": {**asdict(cfg), "threads": torch.get_num_threads(), "torch": torch.__version__,
                   "python": platform.python_version(), "dtype": "float32", "model": "mlp",
                   "data": "mnist5k", "train_size": len(train_set), "test_size": len(test_set)},
        "results": results,
        "summary": summarize(results),
    }
    if out is not None:
        write_json(Path(out) / "stability.json", doc)
    return doc


def summarize(results: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """``{optimizer: {"runs": n, "diverged": k}}``."""
    summary: dict[str, dict[str, int]] = {}
    for r in results:
        s = summary.setdefault(r["optimizer"], {"runs": 0, "diverged": 0})
        s["runs"] += 1
        s["diverged"] += int(r["diverged"])
    return summary


def format_stability(doc: dict[str, Any]) -> str:
    """A table per (optimizer, damping): diverged runs, mean final loss and test accuracy."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in doc["results"]:
        groups.setdefault((r["optimizer"], r["damping"]), []).append(r)
    rows = []
    for (name, damping), rs in groups.items():
        losses = [r["final_train_loss"] for r in rs if _finite(r["final_train_loss"])]
        accs = [r["test_accuracy"] for r in rs if r["test_accuracy"] is not None]
        rows.append([name, f"{damping:g}", f"{sum(r['diverged'] for r in rs)}/{len(rs)}",
                     sum(losses) / len(losses) if losses else None,
                     sum(accs) / len(accs) if accs else None])
    table = format_table(["optimizer", "damping", "diverged", "final_train_loss", "test_acc"],
                         rows)
    totals = ", ".join(f"{k}: {v['diverged']}/{v['runs']} diverged"
                       for k, v in doc["summary"].items())
    return f"{table}\n\n{totals}"
