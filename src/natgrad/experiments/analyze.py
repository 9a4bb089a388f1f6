"""The analysis experiment behind ``natgrad analyze``: a fresh or trained model, its Fisher on
``samples`` training samples, a report.

:func:`run_analyze` loads the model (a registry name or a checkpoint of ``natgrad compare
--save-model``) and the data, runs :func:`natgrad.fisher.analysis.analyze`, and returns the
report (writing ``report.json`` and the plots when given a folder).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..curvature import FISHER_TYPES
from ..data import DATASETS, load_dataset
from ..factors import ProjectedOptions
from ..models import build_model, get_model_spec, load_checkpoint
from ..models.registry import check_model_args
from ..report import format_table, optional_figures, write_json
from .errors import ExperimentError

#: the stages of :func:`natgrad.fisher.analysis.analyze`, in order (for progress bars)
STAGES = ("trace", "kfac", "top_k", "density", "approximation", "layers")


@dataclass
class AnalyzeConfig:
    """Settings of :func:`run_analyze` (the flags of ``natgrad analyze``).

    Attributes:
        model: a registry name for a fresh model (default ``cnn``) — or ``checkpoint``.
        hidden: widths of a fresh model that takes them (e.g. the MLP's hidden layers).
        checkpoint: a model saved by ``natgrad compare --save-model``.
        data, data_dir: the data set (default ``mnist5k`` or the checkpoint's).
        samples: training samples ``N`` the Fisher is taken over.
        fisher: ``"exact"``, ``"mc"`` or ``"empirical"``.
        top_k, density, probes, slq_steps, damping, tol: as
            :func:`~natgrad.fisher.analysis.analyze`.
        rank: rank of the projected K-FAC approximation (the strategy's default).
        cache_mb: memory for cached forward passes (0: no cache).
        memory_gb: the memory budget of the analysis in GiB (``None``: what the machine has
            free when it starts, :func:`natgrad.fisher.budget.available_bytes`); the stages are
            planned under it and a request that cannot fit fails before any large allocation.
        spectrum: ``"auto"``, ``"gram"`` or ``"lanczos"``: where the spectrum comes from
            (:data:`natgrad.fisher.analysis.SPECTRUM_METHODS`).
        threads: ``torch.set_num_threads``.
        seed: initial weights (fresh model) and probes.
        out: folder for ``report.json`` and the plots (``None``: write nothing).
    """

    model: str | None = None
    checkpoint: str | None = None
    hidden: tuple[int, ...] | None = None
    data: str | None = None
    data_dir: str | None = None
    samples: int = 1000
    fisher: str = "exact"
    top_k: int = 10
    density: bool = True
    probes: int = 4
    slq_steps: int = 40
    damping: float = 1e-3
    tol: float = 1e-3
    rank: int = ProjectedOptions.rank
    cache_mb: int = 1024
    memory_gb: float | None = None
    spectrum: str = "auto"
    threads: int | None = None
    seed: int = 0
    out: str | Path | None = None

    def __post_init__(self) -> None:
        if self.model is not None and self.checkpoint is not None:
            raise ValueError("give a model name or a checkpoint, not both")
        if self.hidden is not None and self.checkpoint is not None:
            raise ValueError("hidden widths are for a fresh model, not a checkpoint")
        for name in ("samples", "top_k", "probes", "slq_steps", "rank", "threads"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if self.memory_gb is not None and not self.memory_gb > 0:
            raise ValueError(f"memory_gb must be positive, got {self.memory_gb}")
        if self.cache_mb < 0:
            raise ValueError(f"cache_mb must be non-negative, got {self.cache_mb}")
        if self.probes < 2 and self.density:
            raise ValueError("probes must be at least 2 for standard errors")
        if not self.damping > 0:
            raise ValueError(f"damping must be positive, got {self.damping}")
        if not 0 < self.tol < 1:
            raise ValueError(f"tol must be in (0, 1), got {self.tol}")
        from ..fisher.analysis import SPECTRUM_METHODS

        if self.spectrum not in SPECTRUM_METHODS:
            raise ValueError(f"invalid spectrum={self.spectrum!r}: accepted values: "
                             f"{list(SPECTRUM_METHODS)}")
        if self.spectrum == "gram" and self.cache_mb == 0:
            raise ValueError("spectrum 'gram' needs the rows in memory: cache_mb above 0")
        if self.fisher not in FISHER_TYPES:
            raise ValueError(f"invalid fisher={self.fisher!r}: accepted values: "
                             f"{list(FISHER_TYPES)}")
        if self.data is not None and self.data not in DATASETS:
            raise ValueError(f"unknown data set {self.data!r}; accepted: {', '.join(DATASETS)}")
        if self.checkpoint is not None and not Path(self.checkpoint).is_file():
            raise ValueError(f"checkpoint {self.checkpoint}: no such file")


def load_model(cfg: AnalyzeConfig) -> tuple[torch.nn.Module, str, str]:
    """``(model, model name, data set name)``; :class:`ExperimentError` for an unusable
    checkpoint or model/data combination."""
    if cfg.checkpoint is not None:
        try:
            model, ckpt = load_checkpoint(cfg.checkpoint)
        except Exception as exc:  # a damaged file / state_dict failure: one line
            text = str(exc) if str(exc).startswith("checkpoint ") else (
                f"checkpoint {cfg.checkpoint}: cannot load ({exc})")
            raise ExperimentError(text.splitlines()[0]) from None
        data = cfg.data or ckpt["dataset"]
        if data != ckpt["dataset"]:
            raise ExperimentError(f"the checkpoint was trained on {ckpt['dataset']!r}, not "
                                  f"{data!r}")
        return model, ckpt["model"], data
    name, data = cfg.model or "cnn", cfg.data or "mnist5k"
    try:
        check_model_args(name, DATASETS[data].info, cfg.hidden)
    except ValueError as exc:
        raise ExperimentError(str(exc)) from None
    torch.manual_seed(cfg.seed)
    return build_model(name, DATASETS[data].info, cfg.hidden), name, data


def run_analyze(cfg: AnalyzeConfig, say: Callable[[str], None] = print,
                progress: Callable[[str], None] = lambda stage: None) -> dict[str, Any]:
    """Build, analyse, report; returns the report (``report.json``'s content)."""
    from ..fisher.analysis import analyze
    from ..fisher.budget import GB, BudgetError, available_bytes
    from ..fisher.plots import plot_report

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    model, name, data_name = load_model(cfg)
    train_set, _ = load_dataset(data_name, cfg.data_dir)
    n = min(cfg.samples, len(train_set))
    spec = get_model_spec(name)
    X = train_set.x[:n]
    y = X.reshape(n, -1) if spec.reconstruct else train_set.y[:n]
    model.eval()  # explicit: the analysis is of the deterministic (eval-mode) network
    num_params = sum(p.numel() for p in model.parameters())
    say(f"natgrad analyze: {name} ({num_params:,} parameters) on {n} {data_name} samples, "
        f"{cfg.fisher} Fisher, loss {spec.loss_kind}, {torch.get_num_threads()} threads")
    t0 = time.perf_counter()
    budget = available_bytes() if cfg.memory_gb is None else int(cfg.memory_gb * GB)
    try:
        report = analyze(model, (X, y), spec.loss_kind, fisher=cfg.fisher, top_k=cfg.top_k,
                         density=cfg.density, probes=cfg.probes, slq_steps=cfg.slq_steps,
                         damping=cfg.damping, tol=cfg.tol, projected_rank=cfg.rank,
                         seed=cfg.seed, cache=cfg.cache_mb > 0, cache_bytes=cfg.cache_mb << 20,
                         progress=progress, memory_bytes=budget, spectrum=cfg.spectrum,
                         on_plan=lambda plan: say(plan.text()))
    except BudgetError as exc:
        origin = "--memory-gb" if cfg.memory_gb is not None else "the memory free now"
        raise ExperimentError(f"{exc}\n(budget from {origin})") from None
    wall = time.perf_counter() - t0
    report = {"model": name, "checkpoint": cfg.checkpoint, "dataset": data_name, **report,
              "wall_time_s": wall, "threads": torch.get_num_threads(),
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    say(report_text(report))
    if cfg.out is not None:
        out = Path(cfg.out)
        plots = optional_figures(plot_report, report, out)
        report["plots"] = [p.name for p in plots]
        write_json(out / "report.json", report)
        say(f"\nwrote {out / 'report.json'} and {', '.join(p.name for p in plots) or 'no plots'} "
            f"({wall:.1f} s, peak RSS {report['peak_rss_mb']:.0f} MB)")
    return report


def report_text(r: dict[str, Any]) -> str:
    """The per-layer table and the headline numbers of a report, as text."""
    keys = list(r["approximations"])
    headers = ["layer", "kind", "params", "trace", "top_eig", *(f"{k}_rel_err" for k in keys)]
    rows = [[row["name"], row["kind"], row["params"], row["trace"], row["top_eigenvalue"],
             *(row[f"{k}_relative_error"] for k in keys)] for row in r["layers"]]
    lines = [format_table(headers, rows)]
    res = max(r["top_residuals"])
    lines.append(f"\ntrace {r['trace']['value']:.6g} (exact)   top-{len(r['top_eigenvalues'])} "
                 f"eigenvalues {', '.join(f'{v:.4g}' for v in r['top_eigenvalues'])} "
                 f"(max rel. residual {res:.1e}, converged {r['top_converged']}; "
                 f"{r.get('spectrum', {}).get('method', 'lanczos')})")
    if r.get("logdet"):
        ld, ed = r["logdet"], r["effective_dimension"]
        if r.get("density", {}).get("exact"):
            lines.append(f"log det(F + {r['damping']:g} I) {ld['value']:.9g}   effective "
                         f"dimension {ed['value']:.6g} (exact: every eigenvalue, from the "
                         "rows' Gram matrix)")
        else:
            lines.append(f"log det(F + {r['damping']:g} I) {ld['value']:.6g} ± "
                         f"{ld.get('error', ld['stderr']):.2g}   effective dimension "
                         f"{ed['value']:.4g} ± {ed.get('error', ed['stderr']):.2g} (error "
                         "bars: probe spread + quadrature error)")
    for k, a in r["approximations"].items():
        e = a["relative_error"]
        lines.append(f"{k}: ‖(F − K)v‖/‖Fv‖ = {e['value']:.3g} ± {e['stderr']:.2g}, top-k "
                     f"overlap {a['top_k_overlap']:.3f}")
    c = r["coupling"]
    lines.append(f"cross-layer coupling (share of ‖Fv‖² off the diagonal blocks) "
                 f"{c['value']:.3g} ± {c['stderr']:.2g}")
    return "\n".join(lines)
