import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from natgrad.cli.main import main
from natgrad.experiments.train import TrainConfig, train
from natgrad.fisher import ExactFisher, exact_trace
from natgrad.fisher.tracking import curvature_callback


def test_curvature_callback_records_trace_and_top(tiny_mlp):
    model, X, y = tiny_mlp
    model = model.float()
    ds = TensorDataset(X.float(), y)
    cb = curvature_callback(ds.tensors, "cross_entropy", samples=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    result = train(model, opt, ds, ds, "cross_entropy",
                   TrainConfig(epochs=2, batch_size=4, progress=False), callbacks=[cb])
    assert [r["epoch"] for r in cb.records] == [1, 2]
    assert result.history[-1]["fisher_trace"] == cb.records[-1]["trace"]
    ref = exact_trace(ExactFisher(model.eval(), (cb.X,))).value
    assert cb.records[-1]["trace"] == pytest.approx(ref, rel=1e-5)
    assert 0 < cb.records[-1]["top_eigenvalue"] <= ref * (1 + 1e-5)


def test_analyze_cli_small(tmp_path):
    rc = main(["analyze", "--model", "mlp", "--samples", "20", "-k", "3", "--probes", "2",
               "--slq-steps", "10", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    report = json.loads((tmp_path / "report.json").read_text())
    for key in ("model", "params", "samples", "fisher", "trace", "top_eigenvalues",
                "effective_dimension", "logdet", "layers"):
        assert key in report
    assert {"name", "params", "trace", "top_eigenvalue", "kfac_relative_error"} <= set(
        report["layers"][0])
    assert (tmp_path / "spectrum.png").exists()


def test_analyze_cli_hidden_widths(tmp_path):
    rc = main(["analyze", "--model", "mlp", "--hidden", "12,6", "--samples", "16", "-k", "2",
               "--no-density", "--probes", "2", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["params"] == 784 * 12 + 12 + 12 * 6 + 6 + 6 * 10 + 10
    assert [row["params"] for row in report["layers"]] == [784 * 12 + 12, 12 * 6 + 6, 6 * 10 + 10]


@pytest.mark.parametrize("argv", [["--model", "resnet8"],
                                  ["--model", "transformer", "--data", "majority"]])
def test_analyze_cli_models_with_norm_layers(tmp_path, argv):
    """Several normalization layers (BatchNorm in resnet8, LayerNorm in the transformer): every
    layer gets its row, its trace the exact one (they add up to the total)."""
    rc = main(["analyze", *argv, "--samples", "3", "-k", "2", "--no-density", "--probes", "2",
               "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    report = json.loads((tmp_path / "report.json").read_text())
    kinds = [row["kind"] for row in report["layers"]]
    assert kinds.count("norm") >= 2
    assert sum(row["params"] for row in report["layers"]) == report["params"]
    assert sum(row["trace"] for row in report["layers"]) == pytest.approx(
        report["trace"]["value"], rel=1e-9)


@pytest.mark.parametrize("argv", [["--samples", "0"], ["--data", "nope"],
                                  ["--checkpoint", "/nonexistent.pt"], ["--damping", "-1"],
                                  ["--model", "cnn", "--hidden", "8"],
                                  ["--model", "mlp", "--hidden", "8,x"]])
def test_analyze_cli_bad_input(argv, capsys):
    assert main(["analyze", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "error" in err


def test_dropout_model_eval_mode_works():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.3), nn.Linear(4, 2)).double().eval()
    X = torch.randn(4, 3, dtype=torch.float64)
    assert ExactFisher(model, (X,)).to_dense().shape == (26, 26)
