"""Cost of curvature maintenance and preconditioning vs layer width, per factor strategy.

One square layer (``W`` is ``d × d``, so both factors are ``d × d``) with batch statistics of
``batch`` rows. For each width, strategy and rank the measurements are interleaved (repeat ``i``
of every configuration runs before repeat ``i + 1`` of any), and the median is reported:

* ``update_time_s``: one factor, statistics → ready-to-apply inverse: ``update`` then
  ``refresh(δ)``. eigh: dense EMA + ``eigh``; cholesky: dense EMA + Cholesky inverse; recursive:
  dense EMA + Woodbury step + residual probes (the refresh is free while the tracked damping is
  inside its band); projected: Rayleigh–Ritz subspace step (its refresh is free).
* ``refresh_time_s`` (recursive only): the exact Cholesky refresh that re-injects the damping
  (about once every ``log 2 / log(1/ρ)`` updates), and ``amortized_update_time_s`` including it.
* ``precondition_time_s``: ``precondition(V, A, G, λ)`` for a ``d × d`` gradient.
* ``state_bytes``: bytes of one factor's state.

``slopes`` are least-squares slopes of ``log(update_time_s)`` against ``log(width)``.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..factors import STRATEGIES, KroneckerFactor, get_strategy, precondition
from ..progress import progress_bar
from ..report import format_table, load_average, optional_figures, pyplot, save_figure, write_json


def strategy_names() -> tuple[str, ...]:
    """Every registered factor strategy (the default of :attr:`ScalingConfig.strategies`)."""
    return tuple(STRATEGIES)


def takes_rank(strategy: str) -> bool:
    """Whether a strategy has a ``rank`` option (it is then measured at each of the ranks)."""
    return "rank" in get_strategy(strategy).Options.names()


@dataclass
class ScalingConfig:
    """Settings of :func:`run_scaling`.

    Attributes:
        widths: layer widths ``d``.
        ranks: ranks of the projected strategy (one curve each).
        strategies: factor strategies to compare.
        batch: rows of the batch statistics.
        repeats: timed repetitions per configuration (median reported); configurations whose
            first measurement exceeds ``slow_s`` use ``min(repeats, slow_repeats)``, those below
            ``fast_s`` use ``fast_factor × repeats`` (cheap, and more robust to a noisy machine).
        slow_s, slow_repeats, fast_s, fast_factor: see ``repeats``.
        decay: EMA decay ρ.
        damping: the layer damping λ (factor dampings ``√λ`` each).
        warmup: untimed updates before timing (the low-rank basis is full, ``P`` is valid).
        dtype: ``"float32"`` or ``"float64"``.
        threads: ``torch.set_num_threads`` (``None``: leave as is).
        seed: seed of the synthetic statistics.
    """

    widths: tuple[int, ...] = (256, 512, 1024, 2048, 4096)
    ranks: tuple[int, ...] = (32, 64)
    strategies: tuple[str, ...] = field(default_factory=strategy_names)
    batch: int = 128
    repeats: int = 5
    slow_s: float = 1.0
    slow_repeats: int = 2
    fast_s: float = 0.05
    fast_factor: int = 3
    decay: float = 0.95
    damping: float = 1e-3
    warmup: int = 3
    dtype: str = "float32"
    threads: int | None = None
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("widths", "ranks"):
            values = getattr(self, name)
            if not values or any(isinstance(v, bool) or int(v) != v or v < 1 for v in values):
                raise ValueError(f"{name} must be positive integers, got {values!r}")
        for s in self.strategies:
            get_strategy(s)  # ValueError naming the accepted strategies
        if not self.strategies:
            raise ValueError("no strategy given")
        for name in ("batch", "repeats", "slow_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be a positive integer, got {self.threads}")


@dataclass
class _Case:
    strategy: str
    width: int
    rank: int | None
    A: KroneckerFactor
    G: KroneckerFactor
    rows_a: list[torch.Tensor]
    rows_g: list[torch.Tensor]
    V: torch.Tensor
    update: list[float] = field(default_factory=list)
    refresh: list[float] = field(default_factory=list)
    precond: list[float] = field(default_factory=list)
    calls: int = 0

    @property
    def label(self) -> str:
        return self.strategy if self.rank is None else f"{self.strategy}_r{self.rank}"


def _make(strategy: str, d: int, rank: int | None, dtype: torch.dtype) -> KroneckerFactor:
    """The strategy's own class (not ``create``: a projected factor stays projected even when
    ``d ≤ r``), at ``rank`` for strategies that take one, defaults otherwise."""
    options = {"rank": min(rank, d)} if rank is not None else {}
    return get_strategy(strategy)(d, options, dtype=dtype)


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _cases(cfg: ScalingConfig, d: int, dtype: torch.dtype, gen: torch.Generator) -> list[_Case]:
    cases = []
    n_rows = cfg.warmup + cfg.repeats + 1
    rows_a = [torch.randn(cfg.batch, d, generator=gen).to(dtype) for _ in range(n_rows)]
    rows_g = [torch.randn(cfg.batch, d, generator=gen).to(dtype) for _ in range(n_rows)]
    V = torch.randn(d, d, generator=gen).to(dtype)
    for s in cfg.strategies:
        for rank in (cfg.ranks if takes_rank(s) else (None,)):
            A, G = _make(s, d, rank, dtype), _make(s, d, rank, dtype)
            cases.append(_Case(s, d, rank, A, G, rows_a, rows_g, V))
    return cases


def _warm(case: _Case, cfg: ScalingConfig) -> None:
    root = math.sqrt(cfg.damping)
    for i in range(cfg.warmup):
        for f, rows in ((case.A, case.rows_a[i]), (case.G, case.rows_g[i])):
            f.update(rows, 1.0 / cfg.batch, cfg.decay)
            f.refresh(root)
    case.calls = cfg.warmup


def _measure(case: _Case, cfg: ScalingConfig) -> None:
    """One repeat: a factor update (+ refresh) and one preconditioning."""
    root = math.sqrt(cfg.damping)
    f = case.A
    rows = case.rows_a[case.calls % len(case.rows_a)]
    case.calls += 1
    if case.strategy == "recursive":
        # the per-update cost; the refresh keeps the damping P holds, so it is free (timed apart)
        case.update.append(_timed(lambda: (f.update(rows, 1.0 / cfg.batch, cfg.decay),
                                           f.refresh(f.damping))))
        case.refresh.append(_timed(lambda: f._exact(root)))  # re-injection of the damping
    else:
        case.update.append(_timed(lambda: (f.update(rows, 1.0 / cfg.batch, cfg.decay),
                                           f.refresh(root))))
    case.precond.append(_timed(lambda: precondition(case.V, case.A, case.G, cfg.damping)))


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if y and y > 0]
    if len(pts) < 2:
        return None
    mx = statistics.fmean(p[0] for p in pts)
    my = statistics.fmean(p[1] for p in pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx > 0 else None


def run_scaling(cfg: ScalingConfig, out: str | Path | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Measure every configuration; write ``scaling.json`` and ``scaling.png`` under ``out``.

    Returns the JSON document: ``config``, ``results`` (one row per strategy, width, rank) and
    ``slopes`` (``"projected"`` is the rank-64 curve, or the largest rank when 64 is not
    measured; every rank also has ``"projected_r<rank>"``).
    """
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    dtype = getattr(torch, cfg.dtype)
    gen = torch.Generator().manual_seed(cfg.seed)
    n_cases = len(cfg.widths) * sum(len(cfg.ranks) if takes_rank(s) else 1
                                    for s in cfg.strategies)
    results: list[dict[str, Any]] = []
    load_before = load_average()
    bar = progress_bar(total=n_cases * cfg.repeats, desc="bench scaling", disable=not progress,
               leave=False, dynamic_ncols=True)
    try:
        for d in sorted(cfg.widths):
            cases = _cases(cfg, d, dtype, gen)
            for case in cases:
                _warm(case, cfg)
            for rep in range(cfg.repeats * cfg.fast_factor):
                for case in cases:  # interleaved: every configuration once per repeat
                    limit = cfg.repeats
                    if case.update:
                        first = case.update[0] + case.precond[0]
                        if first > cfg.slow_s:
                            limit = min(cfg.repeats, cfg.slow_repeats)
                        elif first < cfg.fast_s:
                            limit = cfg.repeats * cfg.fast_factor
                    if rep < limit:
                        bar.set_postfix_str(f"d={d} {case.label}")
                        _measure(case, cfg)
                        bar.update(1)
                    if rep == 1:  # the number of repeats of this case is known now
                        bar.total += limit - cfg.repeats
                        bar.refresh()
            for case in cases:
                row = {
                    "strategy": case.strategy,
                    "width": d,
                    "rank": case.rank,
                    "batch": cfg.batch,
                    "update_time_s": statistics.median(case.update),
                    "precondition_time_s": statistics.median(case.precond),
                    "update_time_min_s": min(case.update),
                    "precondition_time_min_s": min(case.precond),
                    "state_bytes": case.A.state_bytes(),
                    "repeats": len(case.update),
                }
                if case.refresh:
                    period = math.log(2.0) / math.log(1.0 / cfg.decay) if cfg.decay > 0 else 1.0
                    row["refresh_time_s"] = statistics.median(case.refresh)
                    row["amortized_update_time_s"] = row["update_time_s"] + row[
                        "refresh_time_s"] / max(period, 1.0)
                results.append(row)
            del cases
    finally:
        bar.close()

    slopes: dict[str, float | None] = {}
    slopes_min: dict[str, float | None] = {}
    labels = sorted({(r["strategy"], r["rank"]) for r in results}, key=lambda t: (t[0], t[1] or 0))
    for strategy, rank in labels:
        rows = sorted((r for r in results if r["strategy"] == strategy and r["rank"] == rank),
                      key=lambda r: r["width"])
        key = strategy if rank is None else f"{strategy}_r{rank}"
        slopes[key] = _slope([r["width"] for r in rows], [r["update_time_s"] for r in rows])
        slopes_min[key] = _slope([r["width"] for r in rows],
                                 [r["update_time_min_s"] for r in rows])
    main_rank = 64 if 64 in cfg.ranks else max(cfg.ranks)
    for s in cfg.strategies:
        if takes_rank(s):  # the strategy's headline curve: rank 64, or the largest measured
            slopes[s] = slopes[f"{s}_r{main_rank}"]
            slopes_min[s] = slopes_min[f"{s}_r{main_rank}"]

    doc = {
        "config": {
            **{k: v for k, v in asdict(cfg).items() if k != "extra"},
            **cfg.extra,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "timing": "median seconds (and minimum, *_min_s); update_time_s is one factor "
                      "(update + refresh), precondition_time_s one d x d gradient through both "
                      "factors",
            "load_average_before": load_before,
            "load_average_after": load_average(),
        },
        "results": results,
        "slopes": slopes,
        "slopes_min": slopes_min,
    }
    if out is not None:
        out = Path(out)
        write_json(out / "scaling.json", doc)
        optional_figures(plot_scaling, doc, out / "scaling.png")
    return doc


def format_scaling(doc: dict[str, Any]) -> str:
    """The results as a table (milliseconds, MiB) followed by the slopes and the eigh ratios."""
    eigh = {r["width"]: r["update_time_s"] for r in doc["results"] if r["strategy"] == "eigh"}
    rows = []
    for r in doc["results"]:
        label = r["strategy"] if r["rank"] is None else f"{r['strategy']} r={r['rank']}"
        ratio = eigh.get(r["width"])
        rows.append([
            label, r["width"], 1e3 * r["update_time_s"],
            1e3 * r["amortized_update_time_s"] if "amortized_update_time_s" in r else None,
            1e3 * r["precondition_time_s"], r["state_bytes"] / 2**20,
            ratio / r["update_time_s"] if ratio else None,
        ])
    table = format_table(
        ["strategy", "width", "update_ms", "amortized_ms", "precond_ms", "state_MiB", "eigh/this"],
        rows,
    )
    slopes = ", ".join(f"{k}: {v:.2f}" if v is not None else f"{k}: -"
                       for k, v in doc["slopes"].items())
    text = f"{table}\n\nlog-log slopes of update time vs width (medians): {slopes}"
    if "slopes_min" in doc:
        text += "\n(minima): " + ", ".join(f"{k}: {v:.2f}" if v is not None else f"{k}: -"
                                         for k, v in doc["slopes_min"].items())
    load = doc["config"].get("load_average_before")
    if load:
        text += f"\n1-min load average before/after: {load[0]:.1f} / "
        text += f"{doc['config']['load_average_after'][0]:.1f} on {os.cpu_count()} CPUs"
    return text


def plot_scaling(doc: dict[str, Any], path: str | Path) -> Path:
    """Log-log plot of update and preconditioning time vs width, one line per strategy (rank)."""
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    keys = sorted({(r["strategy"], r["rank"]) for r in doc["results"]},
                  key=lambda t: (t[0], t[1] or 0))
    for strategy, rank in keys:
        rows = sorted((r for r in doc["results"] if r["strategy"] == strategy
                       and r["rank"] == rank), key=lambda r: r["width"])
        label = strategy if rank is None else f"{strategy} r={rank}"
        key = strategy if rank is None else f"{strategy}_r{rank}"
        slope = doc["slopes"].get(key)
        if slope is not None:
            label += f" (slope {slope:.2f})"
        w = [r["width"] for r in rows]
        axes[0].loglog(w, [r["update_time_s"] for r in rows], "o-", label=label)
        axes[1].loglog(w, [r["precondition_time_s"] for r in rows], "o-",
                       label=label.split(" (")[0])
    axes[0].set_title("curvature update (one factor, to ready inverse)")
    axes[1].set_title("preconditioning of a d×d gradient")
    widths = sorted({r["width"] for r in doc["results"]})
    for ax in axes:
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.minorticks_off()
        ax.set_xlabel("width d")
        ax.set_ylabel("seconds (median)")
        ax.legend(fontsize=8)
    cfg = doc["config"]
    fig.suptitle(f"batch {cfg['batch']}, {cfg['dtype']}, {cfg['threads']} threads", fontsize=10)
    return save_figure(fig, path, axes, legend=False)
