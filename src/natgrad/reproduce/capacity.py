"""The ``capacity`` part of ``natgrad reproduce``: :func:`natgrad.bench.capacity.run_capacity`
(what ``natgrad bench capacity`` runs) over the mode's widths, its markdown section and its
run-time estimate."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .context import Context
from .format import figure, md_table, num
from .settings import CALIBRATION_REF_S, Settings

_GIB = 2**30
#: float32 FLOP per second of the batch-128 matrix products of a step on the 2-core reference
#: (measured: the 784-8192-8192-10 MLP, SGD)
FLOP_RATE = 6e10
#: seconds of a child's start (imports, data) on the reference
START_S = 4.0
#: step time over SGD's, by optimizer, for the estimate (K-FAC adds its decompositions)
STEP_FACTOR = {"sgd": 1.0, "adam": 1.3, "pkfac": 1.4}


def run_capacity(ctx: Context) -> dict[str, Any]:
    """Every configuration of the mode, one child process each, with the parent's torch
    threads; ``{"bench": capacity.json's document, "figure": path or None}``."""
    from ..bench.capacity import CapacityConfig, format_capacity
    from ..bench.capacity import run_capacity as bench

    s = ctx.settings
    out = ctx.work / "capacity"
    ctx.note(f"capacity: widths {','.join(map(str, s.capacity_widths))}")
    cfg = CapacityConfig(widths=s.capacity_widths, cnn_channels=s.capacity_cnn_channels,
                         optimizers=s.capacity_optimizers, steps=s.capacity_steps,
                         warmup=s.capacity_warmup, time_budget_s=s.capacity_time_budget_s,
                         memory_budget_gib=s.capacity_memory_budget_gib,
                         threads=torch.get_num_threads())
    doc = bench(cfg, out, progress=False,
                command=f"natgrad reproduce{'' if s.mode == 'full' else ' --' + s.mode} "
                        "--only capacity")
    ctx.log(format_capacity(doc))
    return {"bench": doc, "figure": ctx.figure(out / "capacity.png", "capacity.png")}


def _status(row: Mapping[str, Any]) -> str:
    extra = row.get("note") or row.get("error")
    return row["status"] if not extra else f"{row['status']} ({extra})"


def _model_title(model: str, rows: list[Mapping[str, Any]]) -> str:
    if model == "mlp":
        return "MLP 784-w-w-10"
    return f"{model}, channels {'-'.join(map(str, rows[0]['hidden']))}"


def capacity_md(doc: Mapping[str, Any]) -> str:
    """A table per model (width, parameters, optimizer, status, first and median step, ×SGD,
    peak RSS, state as a share of the parameters' bytes), the budgets and the figure."""
    bench = doc["bench"]
    meta, cfg = bench["meta"], bench["config"]
    parts = [
        f"Each configuration in its own process: {cfg['steps']} timed steps (median) after the "
        f"first step and {cfg['warmup']} warm-up steps, batch {cfg['batch']}, float32, "
        f"{meta['data']}; torch threads {meta['torch_threads']}. Budgets per configuration: "
        f"{num(meta['time_budget_s'])} s of steps and {num(meta['memory_budget_gib'])} GiB "
        "resident. *first step*: includes dense K-FAC's first eigendecomposition; *peak RSS*: "
        "the process's measured peak resident set (torch included); *state*: optimizer state "
        "bytes as a share of the parameters' bytes. Command: "
        f"`{meta['command']}`.",
    ]
    models = list(dict.fromkeys(r["model"] for r in bench["rows"]))
    for model in models:
        rows = [r for r in bench["rows"] if r["model"] == model]
        table = [[r["width"], r["params"], r["optimizer"], _status(r), r["first_step_s"],
                  r["step_time_s_median"],
                  None if r["ratio_to_sgd"] is None else f"{num(r['ratio_to_sgd'])}×",
                  None if r["peak_rss_bytes"] is None else r["peak_rss_bytes"] / _GIB,
                  None if r["state_fraction"] is None else f"{num(100 * r['state_fraction'])} %"]
                 for r in rows]
        parts.append(f"**{_model_title(model, rows)}**")
        parts.append(md_table(["width", "params", "optimizer", "status", "first step s",
                               "median step s", "×SGD", "peak RSS GiB", "state / params"],
                              table, "rrllrrrrr"))
    if doc.get("figure"):
        parts.append(figure(doc["figure"], "step time over SGD's and peak memory vs parameters"))
    return "\n\n".join(parts)


def _mlp_params(w: int) -> int:
    return 784 * w + w + w * w + w + 10 * w + 10


def estimate_capacity(s: Settings) -> float:
    """Rough seconds of the part on the reference machine: per configuration a process start
    and ``1 + warmup + steps`` steps at the matrix-product rate, with K-FAC's dense
    eigendecompositions every 10 steps at the reference ``eigh`` speed; each configuration is
    capped at its time budget, and an optimizer that hits it is not counted at larger MLPs."""
    eigh_per_d3 = CALIBRATION_REF_S[1] / 256**3
    n_steps = 1 + s.capacity_warmup + s.capacity_steps
    # (weights times the positions they are applied at, the widest factors)
    sizes = [(_mlp_params(w), (w, w + 1, w)) for w in s.capacity_widths]
    if s.capacity_cnn_channels:
        c = (1, *s.capacity_cnn_channels)
        uses = sum(784 // 4**i * 9 * c[i] * c[i + 1] for i in range(len(c) - 1))
        sizes.append((uses, (c[-1], 9 * c[-2] + 1)))
    total = 0.0
    stopped: set[str] = set()  # the bench skips larger MLPs after a budget was hit
    for i, (uses, dims) in enumerate(sizes):
        sgd = 6 * 128 * uses / FLOP_RATE
        for opt in s.capacity_optimizers:
            if opt in stopped and i < len(s.capacity_widths):
                continue
            base = opt.removesuffix("-every")
            step = sgd * STEP_FACTOR.get(base, 2.0)
            if opt.endswith("-every"):
                step *= 1.5
            if base in ("kfac", "rkfac"):
                every = 1 if opt.endswith("-every") else 10
                step += sum(eigh_per_d3 * d**3 for d in dims) / every
            if n_steps * step > s.capacity_time_budget_s:
                stopped.add(opt)
            total += START_S + min(n_steps * step, s.capacity_time_budget_s)
    return total
