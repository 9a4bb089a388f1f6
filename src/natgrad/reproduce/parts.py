"""The parts of ``natgrad reproduce``: each runs natgrad's own commands (in-process, through
:func:`natgrad.cli.main.main`) or its training loop, and returns a JSON-ready document.

A part raises :class:`PartUnavailable` when a command or feature it needs is not in this checkout,
and records partial failures under ``"errors"`` in its document; other exceptions propagate to the
runner, which reports the part as failed.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from ..models import get_model_spec
from ..report import plot_curvature
from .settings import MODELS, PARITY_OPTIMIZERS, Settings


class PartUnavailable(Exception):
    """A command or feature the part needs is missing (not implemented yet)."""


class CommandFailed(Exception):
    """A ``natgrad`` sub-command returned a non-zero exit code (message: its last error line)."""


@dataclass
class Context:
    """What the parts share: settings, output folders, a scratch folder, a log, progress notes."""

    settings: Settings
    out: Path
    work: Path
    discussion: Path | None = None
    note: Callable[[str], None] = lambda text: None
    shared: dict[str, Any] = field(default_factory=dict)

    @property
    def results_dir(self) -> Path:
        return self.out / "results"

    @property
    def figures_dir(self) -> Path:
        return self.out / "figures"

    @property
    def log_path(self) -> Path:
        return self.results_dir / "reproduce.log"

    def figure(self, src: Path, name: str) -> str | None:
        """Copy ``src`` to ``figures/name``; returns the path relative to RESULTS.md."""
        if not src.is_file():
            return None
        self.figures_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, self.figures_dir / name)
        return f"figures/{name}"


def natgrad(ctx: Context, argv: Sequence[str]) -> str:
    """Run ``natgrad ARGV`` in-process, its output appended to the log; returns its stdout.

    Raises :class:`CommandFailed` (its last stderr line) on a non-zero exit code.
    """
    from ..cli.main import main

    argv = [str(a) for a in argv]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    ctx.log_path.parent.mkdir(parents=True, exist_ok=True)
    with ctx.log_path.open("a") as log:
        log.write(f"$ natgrad {' '.join(argv)}\n{out.getvalue()}{err.getvalue()}(exit {rc})\n\n")
    if rc != 0:
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        raise CommandFailed(lines[-1] if lines else f"natgrad {argv[0]} exited with {rc}")
    return out.getvalue()


def has_command(ctx: Context, *words: str) -> str | None:
    """The ``--help`` text of ``natgrad WORDS``, or ``None`` if there is no such command."""
    try:
        return natgrad(ctx, [*words, "--help"])
    except CommandFailed:
        return None


def require_command(ctx: Context, *words: str) -> str:
    text = has_command(ctx, *words)
    if text is None:
        raise PartUnavailable(f"`natgrad {' '.join(words)}` is not implemented in this checkout")
    return text


def available_optimizers(names: Sequence[str] = PARITY_OPTIMIZERS) -> tuple[list[str], list[str]]:
    """``(registered, missing)`` among ``names``, looked up in the registry now."""
    from ..optim.registry import OPTIMIZERS

    return [n for n in names if n in OPTIMIZERS], [n for n in names if n not in OPTIMIZERS]


def _data_args(s: Settings, model: str) -> list[str]:
    args = []
    if s.hidden.get(model):
        args += ["--hidden", s.hidden[model]]
    if s.limit_train.get(model):
        args += ["--limit-train", s.limit_train[model]]
    if s.limit_test.get(model):
        args += ["--limit-test", s.limit_test[model]]
    return args


def compare(ctx: Context, model: str, optimizers: Sequence[str], epochs: int, seed: int,
            out: Path, *extra: Any) -> dict[str, Any]:
    """``natgrad compare`` for one model and seed; returns its ``results.json``."""
    natgrad(ctx, ["compare", "--model", model, "--optimizers", ",".join(optimizers),
                  "--epochs", epochs, "--seed", seed, "--out", out, "--no-progress",
                  *_data_args(ctx.settings, model), *extra])
    return json.loads((out / "results.json").read_text())


def _metric(model: str) -> str:
    return "test_loss" if get_model_spec(model).reconstruct else "test_accuracy"


# ---- 1. parity ---------------------------------------------------------------------------------


def run_parity(ctx: Context) -> dict[str, Any]:
    """Every registered optimizer of :data:`PARITY_OPTIMIZERS` on each model, once per seed."""
    s = ctx.settings
    opts, missing = available_optimizers()
    doc: dict[str, Any] = {"seeds": list(s.seeds), "optimizers": opts, "missing": missing,
                           "models": {}}
    total, done = len(MODELS) * len(s.seeds), 0
    for model in MODELS:
        entry: dict[str, Any] = {"epochs": s.epochs[model], "metric": _metric(model),
                                 "seed_runs": [], "figures": []}
        doc["models"][model] = entry
        for seed in s.seeds:
            done += 1
            ctx.note(f"{model} seed {seed} ({done}/{total})")
            out = ctx.work / "parity" / f"{model}-seed{seed}"
            try:
                res = compare(ctx, model, opts, s.epochs[model], seed, out)
            except CommandFailed as exc:
                entry["error"] = str(exc)
                doc.setdefault("errors", []).append(f"{model} seed {seed}: {exc}")
                break
            entry["seed_runs"].append({"seed": seed, "config": res["config"], "runs": res["runs"]})
            if seed == s.seeds[0]:
                for name in res.get("plots", []):
                    path = ctx.figure(out / name, f"parity-{model}-{name}")
                    if path:
                        entry["figures"].append(path)
    ctx.shared["parity"] = doc
    return doc


# ---- 2. timing ---------------------------------------------------------------------------------

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
    from ..models import build_model
    from ..optim.registry import make_optimizer
    from ..train import TrainConfig, train
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
            entry: dict[str, Any] = {"metric": _metric(model), "seed_runs": []}
            try:
                res = compare(ctx, model, opts, s.epochs[model], seed,
                              ctx.work / "timing" / model)
                entry["seed_runs"].append({"seed": seed, "runs": [_slim(x) for x in res["runs"]]})
            except CommandFailed as exc:
                entry["error"] = str(exc)
                doc.setdefault("errors", []).append(f"{model}: {exc}")
            doc["models"][model] = entry
    for entry in doc["models"].values():
        entry["ratios"] = timing_ratios(entry["seed_runs"])
    doc["wide"] = run_wide(ctx, s.seeds[0])
    return doc


# ---- 3. scaling, 4. stability ------------------------------------------------------------------


def _csv(values: Sequence[Any]) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def run_scaling(ctx: Context) -> dict[str, Any]:
    """``natgrad bench scaling`` over the mode's widths."""
    s = ctx.settings
    require_command(ctx, "bench", "scaling")
    out = ctx.work / "scaling"
    ctx.note(f"widths {_csv(s.scaling_widths)}")
    natgrad(ctx, ["bench", "scaling", "--widths", _csv(s.scaling_widths),
                  "--ranks", _csv(s.scaling_ranks), "--repeats", s.scaling_repeats,
                  "--out", out, "--no-progress"])
    bench = json.loads((out / "scaling.json").read_text())
    return {"bench": bench, "figure": ctx.figure(out / "scaling.png", "scaling.png")}


def run_stability(ctx: Context) -> dict[str, Any]:
    """``natgrad bench stability`` over the mode's dampings and seeds."""
    s = ctx.settings
    require_command(ctx, "bench", "stability")
    out = ctx.work / "stability"
    ctx.note(f"{len(s.stability_dampings)} dampings x {len(s.stability_seeds)} seeds")
    argv: list[Any] = ["bench", "stability", "--dampings", _csv(s.stability_dampings),
                       "--seeds", _csv(s.stability_seeds), "--out", out, "--no-progress"]
    if s.stability_limit_train:
        argv += ["--limit-train", s.stability_limit_train]
    if s.mode == "tiny":
        argv += ["--limit-test", 64]
    natgrad(ctx, argv)
    return {"bench": json.loads((out / "stability.json").read_text())}


# ---- 5. analysis -------------------------------------------------------------------------------


def _analysis_data_args(s: Settings) -> list[Any]:
    args: list[Any] = []
    if s.analysis_limit_train:
        args += ["--limit-train", s.analysis_limit_train]
    if s.limit_test.get("cnn"):
        args += ["--limit-test", s.limit_test["cnn"]]
    return args


def _tracking_from_history(res: dict[str, Any]) -> dict[str, list[dict[str, Any]]] | None:
    runs = {}
    for run in res["runs"]:
        rows = [{"epoch": r["epoch"], "trace": r.get("fisher_trace"),
                 "top_eigenvalue": r.get("fisher_top_eigenvalue")} for r in run["history"]]
        if not any(r["trace"] is not None for r in rows):
            return None
        runs[run["optimizer"]] = rows
    return runs


def _track_with_callback(ctx: Context, opts: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """Train the CNN per optimizer from the same start with the curvature callback."""
    try:
        from ..fisher.tracking import curvature_callback
    except ImportError as exc:
        raise PartUnavailable(f"natgrad.fisher.tracking is not available ({exc})") from None
    from ..data import load_dataset
    from ..models import build_model
    from ..optim.registry import make_optimizer
    from ..train import TrainConfig, train

    s = ctx.settings
    train_set, test_set = load_dataset("mnist5k")
    if s.analysis_limit_train:
        train_set = train_set.subset(s.analysis_limit_train)
    if s.limit_test.get("cnn"):
        test_set = test_set.subset(s.limit_test["cnn"])
    torch.manual_seed(0)
    initial = build_model("cnn", train_set.info)
    train_data = TensorDataset(train_set.x, train_set.y)
    test_data = TensorDataset(test_set.x, test_set.y)
    runs = {}
    for name in opts:
        ctx.note(f"curvature tracking: {name}")
        model = copy.deepcopy(initial)
        cb = curvature_callback(train_data.tensors, "cross_entropy", samples=s.tracking_samples)
        cb(0, model, {})  # the initial point
        opt = make_optimizer(name, model, loss_kind="cross_entropy")
        train(model, opt, train_data, test_data, "cross_entropy",
              TrainConfig(epochs=s.analysis_epochs, seed=0, progress=False), callbacks=[cb])
        runs[name] = cb.records
    return runs


def run_analysis(ctx: Context) -> dict[str, Any]:
    """Train a CNN with SGD, ``natgrad analyze`` its checkpoint; track curvature over training."""
    s = ctx.settings
    doc: dict[str, Any] = {"trained_with": "sgd", "epochs": s.analysis_epochs, "figures": []}
    work = ctx.work / "analysis"
    if has_command(ctx, "analyze") is None:
        doc["analyze_error"] = "`natgrad analyze` is not implemented in this checkout"
    else:
        ctx.note("training the CNN")
        res = compare(ctx, "cnn", ["sgd"], s.analysis_epochs, 0, work / "train",
                      "--save-model", work / "cnn.pt", *_analysis_data_args(s))
        doc["test_accuracy"] = res["runs"][0]["test_accuracy"]
        ctx.note(f"natgrad analyze on {s.analysis_samples} samples")
        argv: list[Any] = ["analyze", "--checkpoint", work / "cnn-sgd.pt",
                           "--samples", s.analysis_samples, "--top-k", s.analysis_top_k,
                           "--probes", s.analysis_probes, "--out", work / "analyze",
                           "--no-progress"]
        if s.mode == "tiny":
            argv += ["--slq-steps", 8, "--rank", 4]
        try:
            natgrad(ctx, argv)
            report = json.loads((work / "analyze" / "report.json").read_text())
            doc["report"] = report
            for name in report.get("plots", []):
                path = ctx.figure(work / "analyze" / name, f"analysis-{name}")
                if path:
                    doc["figures"].append(path)
        except CommandFailed as exc:
            doc["analyze_error"] = str(exc)
            doc.setdefault("errors", []).append(f"analyze: {exc}")

    opts, _ = available_optimizers(s.tracking_optimizers)
    tracking: dict[str, Any] = {"samples": s.tracking_samples, "optimizers": opts}
    doc["tracking"] = tracking
    try:
        runs = None
        help_text = has_command(ctx, "compare") or ""
        if "--track-curvature" in help_text:
            try:
                res = compare(ctx, "cnn", opts, s.analysis_epochs, 0, work / "track",
                              "--track-curvature", *_analysis_data_args(s))
                runs = _tracking_from_history(res)
                tracking["source"] = "`natgrad compare --track-curvature`"
            except CommandFailed as exc:
                tracking["compare_error"] = str(exc)
        if runs is None:
            runs = _track_with_callback(ctx, opts)
            tracking["source"] = ("natgrad.train with natgrad.fisher.tracking.curvature_callback;"
                                  " epoch 0 is the initial model")
        tracking["runs"] = runs
        tracking["figure"] = ctx.figure(
            plot_curvature(runs, work / "curvature_tracking.png"),
            "analysis-curvature_tracking.png")
    except PartUnavailable as exc:
        tracking["error"] = str(exc)
    if doc.get("analyze_error") and tracking.get("error"):
        raise PartUnavailable(f"{doc['analyze_error']}; tracking: {tracking['error']}")
    return doc


# ---- 6. discussion -----------------------------------------------------------------------------


def run_discussion(ctx: Context) -> dict[str, Any]:
    """docs/DISCUSSION.md, verbatim."""
    path = ctx.discussion
    if path is None or not path.is_file():
        raise PartUnavailable(f"{path or 'docs/DISCUSSION.md'} not found")
    return {"path": str(path), "text": path.read_text()}


RUNNERS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "parity": run_parity,
    "timing": run_timing,
    "scaling": run_scaling,
    "stability": run_stability,
    "analysis": run_analysis,
    "discussion": run_discussion,
}
