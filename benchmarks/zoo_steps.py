"""Step time of the projected K-FAC recipe against AdamW on the zoo models (issue 24).

For every model of :data:`natgrad.models.zoo.ZOO` two copies of the same initial weights train on
the same random batches, one with ``pkfac`` (``natgrad.KFAC(model, factors="projected", ...)`` at
its registry settings: :data:`natgrad.optim.registry.PKFAC`, rank 24) and one with ``adamw``,
taking turns step by step (:func:`natgrad.bench.steps.round_robin`; the order rotates every
round). A step is forward, loss, ``zero_grad``, backward and ``step()`` — pkfac's curvature and
refresh steps (every 10th) included at their share. Reported: the median step time of each and
the median over rounds of the per-round ratio pkfac / adamw (target: ≤ 1.3), and the fraction
of the parameters pkfac preconditions (the rest take its plain step, which is cheap: a low
fraction makes the ratio look better than the recipe is).

Usage::

    python benchmarks/zoo_steps.py [--size small|tiny] [--models gpt2,vit_like] [--rounds 40]
                                   [--batch 64] [--threads 2] [--json zoo_steps.json]

``--size tiny`` uses the test suite's widths (a few thousand parameters, where per-layer
overhead dominates); ``small`` (default) widens every model to 32–64 channels. A model whose
pkfac step fails is reported with the error. The transformers models need the ``zoo`` extra.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from typing import Any

import torch
import torch.nn.functional as F

from natgrad.bench.steps import round_robin, summarise, train_step
from natgrad.models.zoo import ZOO
from natgrad.optim import make_optimizer
from natgrad.report import format_table

#: per model, the widths of ``--size small`` (``tiny``: the builders' defaults)
SMALL: dict[str, dict[str, Any]] = {
    "mobilenet_like": {"width": 32},
    "convnext_like": {"dims": (32, 64)},
    "vit_like": {"dim": 64, "depth": 4, "heads": 4},
    "resnet_inplace": {"width": 32},
    "gpt2": {"dim": 64, "layers": 2, "heads": 4},
    "bert": {"dim": 64, "layers": 2, "heads": 4},
    "llama": {"dim": 64, "layers": 2, "heads": 4, "kv_heads": 2},
}
VARIANTS = ("adamw", "pkfac")


def loss_fn(output: str):
    """Cross-entropy on class logits, or on next-token logits (``t`` predicts ``t + 1``)."""

    def loss(out: Any, y: torch.Tensor) -> torch.Tensor:
        out = out if isinstance(out, torch.Tensor) else out.logits
        if output == "sequence":
            return F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]),
                                   y[:, 1:].reshape(-1))
        return F.cross_entropy(out, y)

    return loss


def measure(name: str, size: str, rounds: int, warmup: int, batch: int, seed: int
            ) -> dict[str, Any]:
    spec = ZOO[name]
    torch.manual_seed(seed)
    initial = spec.build(**(SMALL[name] if size == "small" else {}))
    gen = torch.Generator().manual_seed(seed)
    batches = [spec.batch(batch, gen) for _ in range(warmup + rounds)]
    steps, covered = {}, 0
    for variant in VARIANTS:
        model = copy.deepcopy(initial).train()
        opt = make_optimizer(variant, model, loss_kind="cross_entropy")
        steps[variant] = train_step(model, opt, loss_fn(spec.output))
        if variant == "pkfac":
            covered = sum(p.numel() for h in opt.layers.values() for p in h.params)
    runs = summarise(round_robin(steps, batches, warmup))
    params = sum(p.numel() for p in initial.parameters())
    return {"params": params, "preconditioned_fraction": covered / params, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("small", "tiny"), default="small")
    parser.add_argument("--models", default=",".join(ZOO),
                        help=f"comma-separated, of: {', '.join(ZOO)}")
    parser.add_argument("--rounds", type=int, default=40, help="timed rounds (default 40)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds (default 3)")
    parser.add_argument("--batch", type=int, default=64, help="samples per step (default 64)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="zoo_steps.json", help="where to write the results")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in ZOO]
    if unknown:
        parser.error(f"unknown --models {unknown}; accepted: {', '.join(ZOO)}")
    if min(args.rounds, args.batch, args.threads) < 1 or args.warmup < 0:
        parser.error("--rounds, --batch and --threads must be positive, --warmup >= 0")
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    doc: dict[str, Any] = {"size": args.size, "rounds": args.rounds, "warmup": args.warmup,
                           "batch": args.batch, "threads": args.threads, "seed": args.seed,
                           "torch": torch.__version__, "load_before": list(load), "models": {}}
    rows = []
    t0 = time.perf_counter()
    for name in models:
        try:
            res = measure(name, args.size, args.rounds, args.warmup, args.batch, args.seed)
        except Exception as exc:  # report and go on: the table says which model failed
            doc["models"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            rows.append([name, "", "", "", "", f"error: {type(exc).__name__}: {str(exc)[:60]}"])
            continue
        doc["models"][name] = res
        adamw, pkfac = res["runs"]
        q1, q3 = pkfac["ratio_quartiles"]
        rows.append([name, f"{res['params']:,}", f"{100 * res['preconditioned_fraction']:.0f} %",
                     f"{1e3 * adamw['step_time_s_median']:.2f}",
                     f"{1e3 * pkfac['step_time_s_median']:.2f}",
                     f"{pkfac['ratio_median']:.2f}x ({q1:.2f}-{q3:.2f})"])
        print(f"{name}: pkfac / adamw {pkfac['ratio_median']:.2f}x", flush=True)
    doc["load_after"] = list(os.getloadavg())
    doc["wall_s"] = time.perf_counter() - t0
    print(f"\nzoo, size {args.size}, batch {args.batch}, {args.rounds} rounds taking turns, "
          f"{args.threads} threads; load average {load[0]:.1f} before, "
          f"{doc['load_after'][0]:.1f} after")
    print(format_table(["model", "params", "preconditioned", "adamw ms", "pkfac ms",
                        "pkfac / adamw (IQR)"], rows))
    with open(args.json, "w") as fh:
        json.dump(doc, fh, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
