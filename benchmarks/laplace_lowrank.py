"""A low-rank Kronecker Laplace posterior of a wide MLP (784-W-W-10) on the embedded MNIST sample.

    PYTHONPATH=src python benchmarks/laplace_lowrank.py --width 1024            # development
    PYTHONPATH=src python benchmarks/laplace_lowrank.py --width 16384 --threads 2 \\
        --out benchmarks/results/laplace_lowrank.json                          # 281M parameters

Stages, each with its wall time and the process's peak resident memory so far
(``resource.getrusage(...).ru_maxrss``):

1. build the MLP (``natgrad.models.build_model("mlp", info, (W, W))``);
2. train it briefly with SGD (momentum 0.9, batch 128) on the ``mnist5k`` train split;
3. fit :class:`natgrad.fisher.posterior.KroneckerLaplace` from the train split: the exact
   Fisher's K-FAC factors as ``projected`` factors (rank ``r`` eigenbasis + scaled identity; each
   chunk folded in as it comes, no ``W × W`` matrix formed), then the prior precision by the
   closed-form log marginal likelihood on a grid;
4. the predictive on the test split: the mean softmax over ``S`` posterior weight samples, of the
   network (``nn``) and of its linearisation (``glm``); test accuracy, NLL and ECE of the MAP
   model and of both predictives (``--also-prior``: at other prior precisions too).

A dense Kronecker fit of the same model would hold and eigendecompose ``W × W`` factors (three
per network at ``W = 16384``: 1 GiB each in float32, hours of ``eigh`` on two cores).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time
from typing import Any

import torch
import torch.nn.functional as F

from natgrad.data import load_dataset
from natgrad.fisher.posterior import KroneckerLaplace
from natgrad.models import build_model


def ece(probs: torch.Tensor, y: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error over equal-width confidence bins."""
    conf, pred = probs.max(1)
    correct = (pred == y).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=conf.dtype)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            total += float(inside.double().mean() * (correct[inside].mean()
                                                      - conf[inside].double().mean()).abs())
    return total


def scores(probs: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    return {"accuracy": float((probs.argmax(1) == y).double().mean()),
            "nll": float(F.nll_loss(probs.double().clamp_min(1e-12).log(), y)),
            "ece": ece(probs, y)}


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Stages:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self._t = time.perf_counter()

    def done(self, name: str, **extra: Any) -> None:
        now = time.perf_counter()
        row = {"stage": name, "seconds": round(now - self._t, 2),
               "peak_rss_gib": round(peak_gib(), 2), **extra}
        self.rows.append(row)
        print(f"{name:28s} {row['seconds']:8.1f} s   peak RSS {row['peak_rss_gib']:6.2f} GiB"
              + "".join(f"   {k} {v}" for k, v in extra.items()), flush=True)
        self._t = time.perf_counter()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=1024, help="hidden width W (two layers)")
    p.add_argument("--steps", type=int, default=40, help="SGD steps (batch 128)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--rank", type=int, default=32, help="rank r of the projected factors")
    p.add_argument("--fisher", default="mc", choices=("exact", "mc", "empirical"),
                   help="the Fisher whose K-FAC factors are fitted (mc: one sampled label)")
    p.add_argument("--fit-samples", type=int, default=None,
                   help="train samples the Laplace is fitted on (default: all)")
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--samples", type=int, default=8, help="posterior samples per predictive")
    p.add_argument("--also-prior", type=float, nargs="*", default=[],
                   help="prior precisions to evaluate the predictives at besides the evidence's")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    stages = Stages()
    load = os.getloadavg()

    train_set, test_set = load_dataset("mnist5k")
    torch.manual_seed(0)
    model = build_model("mlp", train_set.info, (a.width, a.width))
    params = sum(p.numel() for p in model.parameters())
    stages.done("build", parameters=params)

    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    model.train()
    step = 0
    while step < a.steps:
        for idx in torch.randperm(len(train_set.y), generator=gen).split(128):
            if step == a.steps:
                break
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(train_set.x[idx]), train_set.y[idx])
            loss.backward()
            opt.step()
            step += 1
    del opt
    for q in model.parameters():
        q.grad = None
    model.eval()
    stages.done("train (SGD)", steps=a.steps, last_loss=round(float(loss.detach()), 4))

    fit_set = (train_set.subset(a.fit_samples) if a.fit_samples else train_set)
    data = (fit_set.x, fit_set.y)
    la = KroneckerLaplace.fit(model, data, fisher=a.fisher, strategy="projected",
                              factor_options={"rank": a.rank}, chunk_size=a.chunk_size)
    stages.done("fit (K-FAC factors)", fit_samples=len(fit_set.y))
    ll = la.log_likelihood(data, chunk_size=a.chunk_size)
    grid = torch.logspace(-2, 6, 33).tolist()
    delta = la.select_prior_precision(ll, grid)
    stages.done("prior precision (evidence)", prior_precision=round(delta, 4),
                log_marglik=round(la.log_marginal_likelihood(ll), 1))

    test = (test_set.x, test_set.y)
    results: dict[str, Any] = {}
    map_probs = la.map_predictive(test)
    results["map"] = scores(map_probs, test_set.y)
    for prior in [None, *a.also_prior]:
        la.prior_precision = delta if prior is None else prior
        tag = "" if prior is None else f"@{prior:g}"
        for kind, linear in (("nn", False), ("glm", True)):
            probs = la.predictive(test, samples=a.samples, seed=0, linearized=linear,
                                  chunk_size=a.chunk_size)
            results[f"laplace_{kind}{tag}"] = scores(probs, test_set.y)
            stages.done(f"predictive ({kind}, {a.samples} samples){tag}")
    for who, r in results.items():
        print(f"{who:18s} accuracy {r['accuracy']:.4f}  NLL {r['nll']:.4f}  ECE {r['ece']:.4f}")
    out = {"width": a.width, "parameters": params, "rank": a.rank, "fisher": a.fisher,
           "sgd_steps": a.steps, "lr": a.lr, "threads": a.threads, "posterior_samples": a.samples,
           "prior_precision": delta, "load_average_at_start": load,
           "load_average_at_end": os.getloadavg(), "stages": stages.rows, "test": results,
           "total_seconds": round(sum(r["seconds"] for r in stages.rows), 1),
           "laplace_seconds": round(sum(r["seconds"] for r in stages.rows
                                        if r["stage"] not in ("build", "train (SGD)")), 1),
           "peak_rss_gib": round(peak_gib(), 2)}
    assert all(math.isfinite(v) for r in results.values() for v in r.values())
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    main()
