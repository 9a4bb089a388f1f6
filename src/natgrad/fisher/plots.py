"""PNG figures of an analysis report (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..report import pyplot, save_figure


def plot_report(report: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """``spectrum.png`` (top-k exact vs K-FAC), ``density.png`` (SLQ), ``layers.png`` (per layer
    top-k exact vs K-FAC). Returns the paths written."""
    plt = pyplot()

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    k = range(1, len(report["top_eigenvalues"]) + 1)
    ax.semilogy(k, report["top_eigenvalues"], "o-", label=f"{report['fisher']} Fisher (Lanczos)")
    for key, a in report["approximations"].items():
        ev = a["top_eigenvalues_closed_form"]
        ax.semilogy(range(1, len(ev) + 1), ev, "s--", ms=4, label=f"{key} (closed form)")
    ax.set(xlabel="index", ylabel="eigenvalue", title="top eigenvalues")
    paths.append(save_figure(fig, out / "spectrum.png", [ax]))

    if report.get("density"):
        d = report["density"]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(d["grid"], d["density"])
        ax.set(xscale="log", yscale="log", xlabel="eigenvalue",
               ylabel="density (per log10 unit)",
               title=f"SLQ spectral density ({len(d['nodes'])} probes)")
        ax.set_ylim(bottom=max(1e-8, min(v for v in d["density"] if v > 0)))
        paths.append(save_figure(fig, out / "density.png", [ax], legend=False))

    layers = report["layers"]
    if layers:
        fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 3.4), squeeze=False)
        for ax, row in zip(axes[0], layers):
            ev = row["top_eigenvalues"]
            ax.semilogy(range(1, len(ev) + 1), ev, "o-", label="exact block")
            for key in report["approximations"]:
                kv = row.get(f"{key}_top_eigenvalues")
                if kv:
                    ax.semilogy(range(1, len(kv) + 1), kv, "s--", ms=4, label=key)
            ax.set(title=f"{row['name']} ({row['kind']}, {row['params']:,})", xlabel="index")
        axes[0][0].set_ylabel("eigenvalue")
        axes[0][0].legend(fontsize=7)
        paths.append(save_figure(fig, out / "layers.png", list(axes[0]), legend=False))
    return paths
