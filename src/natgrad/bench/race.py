"""Time to result, AlgoPerf-style: natgrad's natural gradient against the optimizers people pick.

Protocol (:func:`run_race`):

1. **Equal tuning budget.** Every optimizer gets ``trials`` short runs (``tune_steps`` steps,
   seed ``tune_seed``) over its own key hyperparameters (:data:`SPACES`: the learning rate, for
   Muon also the AdamW rate, for natgrad's K-FAC also the KL-clip κ and the damping λ). Trial 0
   is the registry's sourced default; the others are drawn log-uniformly from the space with a
   generator seeded per optimizer. A trial scores its loss on the validation split; the lowest
   wins (a non-finite loss never does).
2. **Race.** At the picked setting, for each seed, all optimizers train a model from the same
   initial weights on the same batch sequence, **taking turns step by step** (round-robin), so
   they share the machine's load. An optimizer's *own time* is the sum of its own step times
   (forward, backward, step); evaluations are excluded.
3. **Score.** The target validation loss is ``target`` or, by default, what tuned AdamW reaches
   at the full budget (its last evaluation; the highest over seeds, so that AdamW reaches it in
   every seed). Reported per optimizer:
   steps and own time to the target (first evaluation at or below it), final validation and test
   loss, and the ratios ``AdamW's time / its time`` (above 1: sooner than AdamW) with their
   range over seeds. For natgrad's K-FAC, the fraction of steps on which the KL-clip bound
   (``ν < 1``: the clip, not the learning rate, set the step length), from the optimizer's
   ``diagnostics()["kl_clip"]`` (of the optimizer or of its preconditioner).

Validation and test losses are over fixed subsets of the validation / test splits
(``eval_samples``) during the race and over whole splits at the end (``final_samples``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import load_dataset
from ..losses import get_loss
from ..models import build_model, default_dataset, get_model_spec, loss_kind
from ..optim import make_optimizer
from ..optim.registry import get_optimizer_spec
from ..report import format_table, load_average, pyplot, save_figure

#: hyperparameter → (low, high) of a log-uniform range, per optimizer; ``lr`` is always first
SPACES: dict[str, dict[str, tuple[float, float]]] = {
    "sgd": {"lr": (3e-3, 0.3)},
    "adam": {"lr": (1e-4, 3e-2)},
    "adamw": {"lr": (1e-4, 3e-2)},
    "muon": {"lr": (3e-3, 0.2), "adamw_lr": (1e-4, 1e-2)},
    "soap": {"lr": (3e-4, 3e-2)},
    "shampoo": {"lr": (3e-4, 3e-2)},
    "kron": {"lr": (1e-4, 1e-2)},
    "kfac": {"lr": (1e-2, 1.0), "kl_clip": (1e-4, 1.0), "damping": (1e-4, 1e-1)},
    "pkfac": {"lr": (1e-2, 1.0), "kl_clip": (1e-4, 1.0), "damping": (1e-4, 1e-1)},
    "pkfac+adamw": {"lr": (1e-4, 1e-2), "kl_clip": (1e-4, 1.0), "damping": (1e-4, 1e-1)},
    # Adam in K-FAC's eigenbasis: no KL-clip, and λ does not enter the step (the basis is the
    # factors' own); SOAP's range
    "eigenadam": {"lr": (3e-4, 3e-2)},
    "peigenadam": {"lr": (3e-4, 3e-2)},
}
#: the registry defaults of the non-lr hyperparameters (trial 0)
KFAC_DEFAULTS = {"kl_clip": 1e-3, "damping": 1e-2}
#: the optimizers every other is compared with (``speedup_vs_<name>_time`` / ``_steps``, per
#: seed: the reference's own time over this optimizer's), each when raced
REFERENCES = ("adamw", "muon")
#: natgrad's own optimizers: their KL-clip binding is counted (0 for those without a clip:
#: EigenAdam's step length is Adam's, the learning rate sets every step)
NATGRAD = ("kfac", "rkfac", "pkfac", "pkfac+adamw", "eigenadam", "peigenadam")


@dataclass(frozen=True)
class RaceConfig:
    """Everything a race fixes (see the module docstring).

    Attributes:
        model: registry model (``gpt``, ``resnet8``, …); ``hidden`` its widths (default: the
            model's); ``data`` its data set (default: the model's); ``context``: characters
            per sample for ``shakespeare_char``.
        optimizers: registry names; ``adamw`` sets the default target.
        steps: steps of each raced run; ``batch``: samples per step.
        trials, tune_steps, tune_seed: the tuning budget per optimizer.
        seeds: seeds of the raced runs (weights and batch order).
        eval_every: steps between validation evaluations.
        eval_samples: validation samples of those evaluations (and of the trials);
            final_samples: validation / test samples of the final losses (``None``: all).
        target: the target validation loss (``None``: tuned AdamW's final one).
        threads: ``torch.set_num_threads``.
    """

    model: str = "gpt"
    hidden: tuple[int, ...] | None = None
    data: str | None = None
    context: int = 64
    optimizers: tuple[str, ...] = ("adamw", "muon", "soap", "shampoo", "pkfac", "pkfac+adamw")
    steps: int = 2000
    batch: int = 32
    trials: int = 8
    tune_steps: int = 300
    tune_seed: int = 100
    seeds: tuple[int, ...] = (0, 1, 2)
    eval_every: int = 50
    eval_samples: int = 512
    final_samples: int | None = None
    target: float | None = None
    threads: int = 1

    def __post_init__(self) -> None:
        get_model_spec(self.model)
        for name in self.optimizers:
            get_optimizer_spec(name)
            if name not in SPACES:
                raise ValueError(f"optimizer {name!r} has no tuning space; accepted: "
                                 f"{', '.join(SPACES)}")
        if len(set(self.optimizers)) != len(self.optimizers) or not self.optimizers:
            raise ValueError(f"optimizers must be distinct and not empty, got {self.optimizers}")
        for name in ("steps", "batch", "trials", "tune_steps", "eval_every", "eval_samples",
                     "threads", "context"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        if self.target is None and "adamw" not in self.optimizers:
            raise ValueError("without adamw among the optimizers, give target=")
        if self.target is not None and not (math.isfinite(self.target) and self.target > 0):
            raise ValueError(f"target must be a positive number, got {self.target!r}")


#: the smoke setting: a 1-block GPT on 16-character windows, seconds in all
SMOKE = RaceConfig(hidden=(16, 1, 2), context=16, optimizers=("adamw", "muon", "pkfac"),
                   steps=6, batch=4, trials=2, tune_steps=3, seeds=(0, 1), eval_every=2,
                   eval_samples=16, final_samples=32)


# --------------------------------------------------------------------------- the task


@dataclass
class Task:
    """The data splits (tensors) and how to build and score a model."""

    cfg: RaceConfig
    train: tuple[torch.Tensor, torch.Tensor]
    validation: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    info: Any
    kind: str = field(init=False)

    def __post_init__(self) -> None:
        self.kind = loss_kind(self.cfg.model)

    def build(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return build_model(self.cfg.model, self.info, self.cfg.hidden)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return get_loss(self.kind).fn(model(x), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: tuple[torch.Tensor, torch.Tensor],
                 n: int | None) -> float:
        """Mean loss over the first ``n`` samples (all: ``None``), in chunks of 256."""
        was = model.training
        model.eval()
        x, y = (split[0][:n], split[1][:n]) if n is not None else split
        total = 0.0
        for i in range(0, len(x), 256):
            total += float(self.loss(model, x[i:i + 256], y[i:i + 256])) * len(x[i:i + 256])
        model.train(was)
        return total / len(x)


def load_task(cfg: RaceConfig) -> Task:
    """The model's data set with a validation split: ``shakespeare_char``'s own, otherwise the
    last 10 % of the training samples (the test split stays unseen until the end)."""
    data = cfg.data or default_dataset(cfg.model)
    if data == "shakespeare_char":
        from ..data.shakespeare import load_shakespeare_splits

        s = load_shakespeare_splits(cfg.context)
        return Task(cfg, s["train"].tensors, s["validation"].tensors, s["test"].tensors,
                    s["train"].info)
    train, test = load_dataset(data)
    n = len(train) - max(1, len(train) // 10)
    return Task(cfg, (train.x[:n], train.y[:n]), (train.x[n:], train.y[n:]),
                (test.x, test.y), train.info)


# --------------------------------------------------------------------------- the KL-clip


def clip_bound_fraction(opt: Any) -> float | None:
    """Share of the steps on which the KL-clip bound, from the optimizer's own count
    (``diagnostics()["kl_clip"]`` of :class:`natgrad.KFAC`, or of the preconditioner of a
    :class:`~natgrad.optim.PreconditionedOptimizer`); 0 for an optimizer without a clip
    (``kl_clip=None``: :class:`natgrad.EigenAdam`, a graft); ``None`` when it counted no step."""
    kfac = opt if hasattr(opt, "diagnostics") else getattr(opt, "preconditioner", None)
    if kfac is not None and hasattr(kfac, "kl_clip") and kfac.kl_clip is None:
        return 0.0
    diag = kfac.diagnostics() if hasattr(kfac, "diagnostics") else None
    clip = diag.get("kl_clip") if isinstance(diag, Mapping) else None
    if not isinstance(clip, Mapping) or not clip.get("steps"):
        return None
    return float(clip["bound"]) / clip["steps"]


# --------------------------------------------------------------------------- tuning


def trial_settings(name: str, trials: int, lr_default: float
                   ) -> list[dict[str, float | str]]:
    """``trials`` settings of ``name``'s space: the registry default first, for natgrad's K-FAC
    recipes then the same with the relative clip (``kl_clip="relative"``), then
    log-uniform draws from a generator seeded by the name (the same for every run of the
    race)."""
    space = SPACES[name]
    first = {"lr": lr_default}
    first.update({k: KFAC_DEFAULTS[k] for k in space if k in KFAC_DEFAULTS})
    if "adamw_lr" in space:
        first["adamw_lr"] = 3e-4
    rng = np.random.default_rng(sum(map(ord, name)))
    out = [first]
    if "kl_clip" in space and trials > 1:  # the relative clip, which leaves the lr alive
        out.append({**first, "kl_clip": "relative"})
    while len(out) < trials:
        out.append({k: float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
                    for k, (lo, hi) in space.items()})
    return out


def _batches(n: int, batch: int, seed: int) -> Iterator[torch.Tensor]:
    """Indices of an endless sequence of shuffled epochs (seeded)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch + 1, batch):
            yield perm[i:i + batch]


class Runner:
    """One model and optimizer being trained, one step at a time."""

    def __init__(self, task: Task, name: str, setting: Mapping[str, float | str],
                 seed: int) -> None:
        self.task, self.name = task, name
        self.model = task.build(seed)
        kw = dict(setting)
        lr = kw.pop("lr")
        self.opt = make_optimizer(name, self.model, lr=lr, loss_kind=task.kind, **kw)
        self.batches = _batches(len(task.train[0]), task.cfg.batch, seed)
        self.own_s = 0.0
        self.steps = 0
        self.failed = False

    def step(self) -> None:
        if self.failed:
            return
        idx = next(self.batches)
        x, y = self.task.train[0][idx], self.task.train[1][idx]
        t0 = time.perf_counter()
        loss = self.task.loss(self.model, x, y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.own_s += time.perf_counter() - t0
        self.steps += 1
        if not math.isfinite(loss.item()):
            self.failed = True


def tune(task: Task, name: str, log: Callable[[str], None]) -> dict[str, Any]:
    """The trials of one optimizer; ``{"trials": [...], "picked": setting}``."""
    cfg = task.cfg
    rows = []
    for setting in trial_settings(name, cfg.trials, get_optimizer_spec(name).lr_for(task.kind)):
        run = Runner(task, name, setting, cfg.tune_seed)
        for _ in range(cfg.tune_steps):
            run.step()
        score = math.inf if run.failed else task.evaluate(run.model, task.validation,
                                                          cfg.eval_samples)
        score = score if math.isfinite(score) else math.inf
        rows.append({"setting": setting, "validation_loss": score})
        log(f"  tune {name} {format_setting(setting)}: validation loss {score:.4g}")
    best = min(rows, key=lambda r: r["validation_loss"])
    return {"trials": rows, "picked": best["setting"]}


def format_setting(setting: Mapping[str, float | str]) -> str:
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in setting.items())


# --------------------------------------------------------------------------- the race


def race_seed(task: Task, picked: Mapping[str, Mapping[str, float | str]], seed: int
              ) -> dict[str, dict[str, Any]]:
    """All optimizers from the same weights and batches, taking turns step by step; per
    optimizer its curve ``[(step, own s, validation loss)]``, final losses and clip steps."""
    cfg = task.cfg
    runs = {name: Runner(task, name, picked[name], seed) for name in cfg.optimizers}
    curves: dict[str, list[list[float]]] = {n: [] for n in runs}
    for n, run in runs.items():
        curves[n].append([0, 0.0, task.evaluate(run.model, task.validation, cfg.eval_samples)])
    for k in range(1, cfg.steps + 1):
        for run in runs.values():
            run.step()
        if k % cfg.eval_every == 0 or k == cfg.steps:
            for name, run in runs.items():
                val = (math.inf if run.failed
                       else task.evaluate(run.model, task.validation, cfg.eval_samples))
                curves[name].append([k, run.own_s, val])
    out = {}
    for name, run in runs.items():
        clip = clip_bound_fraction(run.opt) if name in NATGRAD else None
        final = {split: (math.inf if run.failed else task.evaluate(run.model, data,
                                                                     cfg.final_samples))
                 for split, data in (("validation", task.validation), ("test", task.test))}
        out[name] = {"curve": curves[name], "own_s": run.own_s, "failed": run.failed,
                     "final_validation_loss": final["validation"],
                     "final_test_loss": final["test"],
                     "step_ms": 1e3 * run.own_s / max(run.steps, 1),
                     "clip_bound_fraction": clip}
    return out


def to_target(curve: Sequence[Sequence[float]], target: float) -> tuple[int | None, float | None]:
    """Steps and own seconds at the first evaluation after step 0 at or below ``target``
    (``None, None``: never)."""
    for step, own, val in curve:
        if step > 0 and val is not None and val <= target:
            return int(step), float(own)
    return None, None


def _spread(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean, min and max of the values (``None`` when any is missing: a seed never got there)."""
    if not values or any(v is None for v in values):
        return {"mean": None, "min": None, "max": None, "n": len(values)}
    return {"mean": float(np.mean(values)), "min": float(min(values)),
            "max": float(max(values)), "n": len(values)}


def summarize(cfg: RaceConfig, seeds: Mapping[int, Mapping[str, Mapping[str, Any]]],
              target: float | None = None) -> dict[str, Any]:
    """Per optimizer: steps and own time to the target, final losses, ratios to AdamW and, when
    raced, to Muon (:data:`REFERENCES`; per seed, the reference's over its own: above 1 is
    sooner), with mean / min / max over seeds."""
    if target is None:
        target = cfg.target
    if target is None:
        # AdamW's last evaluation (the same validation samples as every curve), the highest
        # over seeds: tuned AdamW reaches it in every seed within the budget
        target = float(max(seeds[s]["adamw"]["curve"][-1][2] for s in seeds))
    rows: dict[str, Any] = {}
    for name in cfg.optimizers:
        per = {s: seeds[s][name] for s in seeds}
        hits = {s: to_target(r["curve"], target) for s, r in per.items()}
        ratios: dict[str, dict[str, Any]] = {}
        for ref_name in REFERENCES:
            if ref_name != "adamw" and ref_name not in cfg.optimizers:
                continue  # AdamW's ratios are always reported (None without AdamW)
            time_ratio, step_ratio = [], []
            for s in seeds:
                ref = to_target(seeds[s][ref_name]["curve"], target) \
                    if ref_name in cfg.optimizers else (None, None)
                mine = hits[s]
                time_ratio.append(None if None in (ref[1], mine[1]) else ref[1] / mine[1])
                step_ratio.append(None if None in (ref[0], mine[0]) else ref[0] / mine[0])
            ratios[f"speedup_vs_{ref_name}_time"] = _spread(time_ratio)
            ratios[f"speedup_vs_{ref_name}_steps"] = _spread(step_ratio)
        clip = [r["clip_bound_fraction"] for r in per.values()]
        rows[name] = {
            "reached": sum(h[0] is not None for h in hits.values()),
            "steps_to_target": _spread([h[0] for h in hits.values()]),
            "own_s_to_target": _spread([h[1] for h in hits.values()]),
            "final_validation_loss": _spread([r["final_validation_loss"] for r in per.values()]),
            "final_test_loss": _spread([r["final_test_loss"] for r in per.values()]),
            "step_ms": _spread([r["step_ms"] for r in per.values()]),
            **ratios,
            "clip_bound_fraction": None if any(c is None for c in clip) else _spread(clip),
        }
    return {"target": target, "target_source": "given" if cfg.target is not None
            else "tuned AdamW's last validation loss (highest over seeds)", "optimizers": rows}


def run_race(cfg: RaceConfig, out_dir: str | Path | None = None,
             log: Callable[[str], None] = lambda s: None, command: str = "") -> dict[str, Any]:
    """Tune, race and score (see the module docstring); writes ``race.json`` and ``race.png``
    under ``out_dir`` when given. Returns the JSON document."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    try:
        task = load_task(cfg)
        tuning = {}
        for name in cfg.optimizers:
            tuning[name] = tune(task, name, log)
            log(f"{name}: picked {format_setting(tuning[name]['picked'])}")
        picked = {n: t["picked"] for n, t in tuning.items()}
        seeds = {}
        for seed in cfg.seeds:
            log(f"race, seed {seed}")
            seeds[seed] = race_seed(task, picked, seed)
    finally:
        torch.set_num_threads(threads)
    n_params = sum(p.numel() for p in task.build(0).parameters())
    doc = {"config": asdict(cfg), "command": command, "parameters": n_params,
           "data": cfg.data or default_dataset(cfg.model),
           "train_samples": len(task.train[0]), "load_average_end": load_average(),
           "wall_s": time.perf_counter() - t0, "tuning": tuning,
           "seeds": {str(s): v for s, v in seeds.items()},
           "summary": summarize(cfg, seeds)}
    if out_dir is not None:
        from ..report import optional_figures, write_json

        out = Path(out_dir)
        write_json(out / "race.json", doc)
        doc["figures"] = [str(p) for p in optional_figures(plot_race, doc, out / "race.png")]
    return doc


# --------------------------------------------------------------------------- output


def format_race(doc: Mapping[str, Any]) -> str:
    """The summary as a plain-text table (mean over seeds, [min, max])."""
    summ = doc["summary"]

    def cell(d: Mapping[str, Any] | None, scale: float = 1.0, digits: int = 3) -> str:
        if d is None or d["mean"] is None:
            return "never" if d is not None else "-"
        m, lo, hi = (scale * d[k] for k in ("mean", "min", "max"))
        return f"{m:.{digits}g} [{lo:.{digits}g}, {hi:.{digits}g}]"

    refs = reference_columns(summ)
    rows = []
    for name, r in summ["optimizers"].items():
        clip = r["clip_bound_fraction"]
        rows.append([name, format_setting(doc["tuning"][name]["picked"]),
                     f"{r['reached']}/{r['steps_to_target']['n']}",
                     cell(r["steps_to_target"]), cell(r["own_s_to_target"]),
                     *(cell(r[key]) for key in refs.values()),
                     cell(r["final_validation_loss"], digits=4),
                     cell(r["final_test_loss"], digits=4), cell(r["step_ms"]),
                     "-" if clip is None else f"{100 * clip['mean']:.0f} %"])
    head = (f"target validation loss {summ['target']:.4g} ({summ['target_source']}); "
            "mean over seeds [min, max]")
    return head + "\n" + format_table(
        ["optimizer", "picked", "reached", "steps to target", "own s to target", *refs,
         "final val", "final test", "ms/step", "clip bound"], rows)


def reference_columns(summary: Mapping[str, Any]) -> dict[str, str]:
    """``{"× AdamW (time)": "speedup_vs_adamw_time", …}``: the time ratios in the summary
    (AdamW's always, Muon's when it was raced), in :data:`REFERENCES` order."""
    first = next(iter(summary["optimizers"].values()), {})
    labels = {"adamw": "AdamW", "muon": "Muon"}
    return {f"× {labels[n]} (time)": f"speedup_vs_{n}_time" for n in REFERENCES
            if f"speedup_vs_{n}_time" in first}


def plot_race(doc: Mapping[str, Any], path: str | Path) -> Path:
    """Validation loss against own wall time, one colour per optimizer, one line per seed, the
    target dashed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(doc["summary"]["optimizers"])
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(names):
        for j, run in enumerate(doc["seeds"].values()):
            curve = np.array([c for c in run[name]["curve"]], dtype=float)
            ax.plot(curve[:, 1], curve[:, 2], color=colours[i % len(colours)], alpha=0.8,
                    lw=1.2, label=name if j == 0 else None)
    ax.axhline(doc["summary"]["target"], color="k", ls="--", lw=0.8, label="target")
    finite = [c[2] for run in doc["seeds"].values() for r in run.values() for c in r["curve"]
              if c[2] is not None and math.isfinite(c[2])]
    if finite:
        ax.set_ylim(min(finite) - 0.05, min(max(finite), 2 * doc["summary"]["target"]) + 0.05)
    ax.set_xlabel("own wall time (s; evaluations excluded)")
    ax.set_ylabel("validation loss")
    ax.set_title(f"{doc['config']['model']} on {doc['data']}: validation loss vs own time")
    return save_figure(fig, path, axes=[ax])


def smoke(**overrides: Any) -> RaceConfig:
    """:data:`SMOKE` with ``overrides``."""
    return replace(SMOKE, **overrides)
