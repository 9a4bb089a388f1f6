"""Plain-text tables, JSON output and comparison plots shared by the command-line tools."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ._optional import MissingExtraError, require


def load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages, rounded (``None`` where the OS has none): the
    benches record them, since a loaded machine slows multi-threaded steps with many small
    operations most (threads wait for a busy core at each one)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: floats to ``digits`` significant figures, ``None`` as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else str(value)
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned first column, right-aligned others, a rule under the header."""
    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [values[0].ljust(widths[0])]
        parts += [v.rjust(w) for v, w in zip(values[1:], widths[1:])]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(list(headers)), rule, *(line(r) for r in cells)])


def _json_safe(value: Any) -> Any:
    """Non-finite floats → ``None`` (JSON has no NaN), tuples → lists, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented, strictly valid JSON (NaN/inf become ``null``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(data), indent=2, allow_nan=False) + "\n")
    return path


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend: the one place figures import it.

    Raises:
        MissingExtraError: matplotlib is not installed (``pip install 'natgrad[plots]'``).
    """
    matplotlib = require("matplotlib", "plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_skipped_plots = False


def optional_figures(make: Callable[..., Path | list[Path]], *args: Any, **kwargs: Any
                     ) -> list[Path]:
    """``make(*args, **kwargs)`` as a list of paths, or ``[]`` when matplotlib is missing.

    What the commands call, so that an installation without the ``plots`` extra still writes its
    JSON and tables; the first skip in a process says so on stderr, once.
    """
    global _skipped_plots
    try:
        made = make(*args, **kwargs)
    except MissingExtraError as exc:
        if not _skipped_plots:
            print(f"natgrad: skipping plots ({exc})", file=sys.stderr, flush=True)
            _skipped_plots = True
        return []
    return [made] if isinstance(made, Path) else list(made)


def save_figure(fig: Any, path: str | Path, axes: Sequence[Any] = (), legend: bool = True) -> Path:
    """Grid (and legend) on ``axes``, tight layout, write ``path`` as a 120-dpi PNG, close."""
    plt = pyplot()

    for ax in axes:
        ax.grid(alpha=0.3)
        if legend:
            ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curvature(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path) -> Path:
    """Exact-Fisher trace and largest eigenvalue per epoch, one line per optimizer.

    ``runs`` maps a label to rows with ``epoch``, ``trace`` and ``top_eigenvalue``
    (``natgrad compare --track-curvature``).
    """
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in runs.items():
        epochs = [r["epoch"] for r in rows]
        axes[0].plot(epochs, [r["trace"] for r in rows], marker="o", ms=3, label=name)
        axes[1].plot(epochs, [r["top_eigenvalue"] for r in rows], marker="o", ms=3, label=name)
    axes[0].set(xlabel="epoch", ylabel="tr F (exact Fisher)", yscale="log")
    axes[1].set(xlabel="epoch", ylabel="largest eigenvalue of F", yscale="log")
    return save_figure(fig, path, axes)


def plot_runs(runs: Sequence[Mapping[str, Any]], out_dir: str | Path) -> list[Path]:
    """Plots of a comparison: loss vs cumulative training time, and accuracy vs epoch.

    ``runs`` are result dicts with ``optimizer`` and ``history`` rows (``epoch``, ``time_s``,
    ``train_loss``, ``test_loss``, ``test_accuracy``). Without accuracies (autoencoder), the second
    plot shows the test loss per epoch. Returns the PNG paths.
    """
    plt = pyplot()

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        h = run["history"]
        t = [r["time_s"] for r in h]
        (line,) = ax.plot(t, [r["test_loss"] for r in h], marker="o", ms=3, label=run["optimizer"])
        ax.plot(t, [r["train_loss"] for r in h], ls="--", color=line.get_color())
    ax.set(xlabel="training time (s)", ylabel="loss (solid: test, dashed: train)", yscale="log")
    paths.append(save_figure(fig, out_dir / "loss_vs_time.png", [ax]))

    has_acc = any(r["history"] and r["history"][0]["test_accuracy"] is not None for r in runs)
    key, label, name = (
        ("test_accuracy", "test accuracy", "accuracy_vs_epoch.png")
        if has_acc
        else ("test_loss", "test loss", "test_loss_vs_epoch.png")
    )
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        h = run["history"]
        ax.plot([r["epoch"] for r in h], [r[key] for r in h], marker="o", ms=3,
                label=run["optimizer"])
    ax.set(xlabel="epoch", ylabel=label)
    paths.append(save_figure(fig, out_dir / name, [ax]))

    tracked = {run["optimizer"]: run["curvature"] for run in runs if run.get("curvature")}
    if tracked:  # natgrad compare --track-curvature
        paths.append(plot_curvature(tracked, out_dir / "curvature_vs_epoch.png"))
    return paths
