"""matplotlib, scipy and tqdm are extras: natgrad imports them lazily and says which to install."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import natgrad.report as report
from natgrad._optional import MissingExtraError, require
from natgrad.cli.main import main
from natgrad.fisher import ExactFisher

SRC = Path(__file__).resolve().parents[1] / "src"


def block(monkeypatch, name: str) -> None:
    """Make ``import name`` (and its submodules) fail as if it were not installed."""
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        monkeypatch.setitem(sys.modules, key, None)
    monkeypatch.setitem(sys.modules, name, None)


def test_require_imports_or_names_the_extra(monkeypatch):
    assert require("scipy.sparse.linalg", "x").__name__ == "scipy.sparse.linalg"
    with pytest.raises(ValueError, match="not an optional dependency"):
        require("numpy", "x")
    block(monkeypatch, "scipy")
    with pytest.raises(MissingExtraError, match=r"pip install 'natgrad\[scipy\]'"):
        require("scipy.sparse.linalg", "to_scipy()")


def test_to_scipy_without_scipy(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2)).double()
    op = ExactFisher(model, (torch.randn(4, 3, dtype=torch.float64),), "cross_entropy")
    block(monkeypatch, "scipy")
    with pytest.raises(ImportError, match=r"scipy is needed for to_scipy\(\).*natgrad\[scipy\]"):
        op.to_scipy()


def test_plots_without_matplotlib_are_skipped_once(monkeypatch, tmp_path, capsys):
    block(monkeypatch, "matplotlib")
    monkeypatch.setattr(report, "_skipped_plots", False)
    with pytest.raises(MissingExtraError, match=r"pip install 'natgrad\[plots\]'"):
        report.pyplot()
    runs = [{"optimizer": "sgd", "history": [{"epoch": 1, "time_s": 1.0, "train_loss": 1.0,
                                               "test_loss": 1.0, "test_accuracy": 0.5}]}]
    assert report.optional_figures(report.plot_runs, runs, tmp_path) == []
    assert report.optional_figures(report.plot_curvature, {}, tmp_path / "c.png") == []
    err = capsys.readouterr().err
    assert err.count("skipping plots") == 1 and "natgrad[plots]" in err
    assert list(tmp_path.iterdir()) == []


def test_optional_figures_returns_the_paths(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"epoch": 1, "trace": 2.0, "top_eigenvalue": 1.0}]
    paths = report.optional_figures(report.plot_curvature, {"sgd": rows}, tmp_path / "c.png")
    assert paths == [tmp_path / "c.png"] and paths[0].stat().st_size > 0


def test_compare_without_matplotlib_writes_results(monkeypatch, tmp_path, capsys):
    block(monkeypatch, "matplotlib")
    monkeypatch.setattr(report, "_skipped_plots", False)
    out = tmp_path / "out"
    assert main(["compare", "--data", "teacher", "--hidden", "8", "--epochs", "1",
                 "--optimizers", "sgd", "--no-progress", "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["plots"] == []
    assert not list(out.glob("*.png"))
    captured = capsys.readouterr()
    assert "skipping plots" in captured.err and "and no plots" in captured.out


def test_core_imports_without_any_extra():
    # A fresh interpreter in which matplotlib, scipy and tqdm cannot be imported: the package,
    # its commands and a K-FAC step must still work.
    code = """
import sys
sys.modules.update(matplotlib=None, scipy=None, tqdm=None)  # import X now fails as if absent
import torch, natgrad, natgrad.cli.main, natgrad.fisher, natgrad.bench.scaling
import natgrad.experiments.train
import natgrad.reproduce.runner
model = torch.nn.Linear(4, 3)
opt = natgrad.KFAC(model, lr=0.1, factors="projected")
torch.nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.arange(8) % 3).backward()
opt.step()
print('ok')
"""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
