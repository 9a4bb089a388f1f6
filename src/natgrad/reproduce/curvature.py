"""The curvature parts of ``natgrad reproduce``: cost scaling, damping stability, the Fisher
analysis of a trained CNN. Each calls the library function its command runs, in this process."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import TensorDataset

from ..report import plot_curvature
from .context import Context, available_optimizers
from .training import compare


def run_scaling(ctx: Context) -> dict[str, Any]:
    """:func:`natgrad.bench.scaling.run_scaling` over the mode's widths (``natgrad bench
    scaling``)."""
    from ..bench.scaling import ScalingConfig, format_scaling
    from ..bench.scaling import run_scaling as bench

    s = ctx.settings
    out = ctx.work / "scaling"
    ctx.note(f"widths {','.join(map(str, s.scaling_widths))}")
    doc = bench(ScalingConfig(widths=s.scaling_widths, ranks=s.scaling_ranks,
                              repeats=s.scaling_repeats), out, progress=False)
    ctx.log(format_scaling(doc))
    return {"bench": doc, "figure": ctx.figure(out / "scaling.png", "scaling.png")}


def run_stability(ctx: Context) -> dict[str, Any]:
    """:func:`natgrad.bench.stability.run_stability` over the mode's dampings and seeds
    (``natgrad bench stability``)."""
    from ..bench.stability import StabilityConfig, format_stability
    from ..bench.stability import run_stability as bench

    s = ctx.settings
    ctx.note(f"{len(s.stability_dampings)} dampings x {len(s.stability_seeds)} seeds")
    doc = bench(StabilityConfig(dampings=s.stability_dampings, seeds=s.stability_seeds,
                                limit_train=s.stability_limit_train,
                                limit_test=64 if s.mode == "tiny" else None),
                ctx.work / "stability", progress=False)
    ctx.log(format_stability(doc))
    return {"bench": doc}


def _track(ctx: Context, opts: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """Train the CNN per optimizer from the same start with the curvature callback; epoch 0 is
    the initial model."""
    from ..data import load_dataset
    from ..experiments.train import TrainConfig, train
    from ..fisher.tracking import curvature_callback
    from ..models import build_model
    from ..optim.registry import make_optimizer

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
    """Train a CNN with SGD, analyse it (``natgrad analyze`` on its checkpoint), and track the
    curvature over training."""
    from ..experiments.analyze import AnalyzeConfig, run_analyze

    s = ctx.settings
    doc: dict[str, Any] = {"trained_with": "sgd", "epochs": s.analysis_epochs, "figures": []}
    work = ctx.work / "analysis"
    ctx.note("training the CNN")
    res = compare(ctx, "cnn", ["sgd"], s.analysis_epochs, 0, work / "train",
                  save_model=str(work / "cnn.pt"), limit_train=s.analysis_limit_train,
                  limit_test=s.limit_test.get("cnn"))
    doc["test_accuracy"] = res["runs"][0]["test_accuracy"]
    ctx.note(f"natgrad analyze on {s.analysis_samples} samples")
    tiny = {"slq_steps": 8, "rank": 4} if s.mode == "tiny" else {}
    cfg = AnalyzeConfig(checkpoint=str(work / "cnn-sgd.pt"), samples=s.analysis_samples,
                        top_k=s.analysis_top_k, probes=s.analysis_probes, out=work / "analyze",
                        **tiny)
    ctx.log(f"$ analyze {cfg.checkpoint} samples={cfg.samples} top_k={cfg.top_k}")
    report = run_analyze(cfg, say=ctx.log)
    doc["report"] = report
    for name in report.get("plots", []):
        path = ctx.figure(work / "analyze" / name, f"analysis-{name}")
        if path:
            doc["figures"].append(path)

    opts, _ = available_optimizers(s.tracking_optimizers)
    runs = _track(ctx, opts)
    doc["tracking"] = {
        "samples": s.tracking_samples, "optimizers": opts, "runs": runs,
        "source": "natgrad.experiments.train with natgrad.fisher.tracking.curvature_callback; "
                  "epoch 0 is the initial model",
        "figure": ctx.figure(plot_curvature(runs, work / "curvature_tracking.png"),
                             "analysis-curvature_tracking.png"),
    }
    return doc
