"""``natgrad compare`` end to end, in-process, on tiny settings."""

from __future__ import annotations

import json

import pytest
import torch

from natgrad.cli.main import main
from natgrad.models import load_checkpoint

RUN_KEYS = {
    "optimizer", "model", "dataset", "epochs", "test_accuracy", "test_loss", "train_loss",
    "wall_time_s", "step_time_s_median", "time_to_target_s", "history",
}
ROW_KEYS = {"epoch", "time_s", "train_loss", "test_loss", "test_accuracy"}
TINY = ["--data", "teacher", "--hidden", "16", "--epochs", "2", "--no-progress"]


def compare(tmp_path, *args: str) -> dict:
    out = tmp_path / "out"
    assert main(["compare", *args, "--out", str(out)]) == 0
    return json.loads((out / "results.json").read_text())


def test_json_contract_and_plots(tmp_path, capsys):
    results = compare(tmp_path, *TINY, "--optimizers", "sgd,adam", "--lr", "sgd=0.2")
    assert set(results) >= {"config", "runs"}
    assert [r["optimizer"] for r in results["runs"]] == ["sgd", "adam"]
    for run in results["runs"]:
        assert RUN_KEYS <= set(run)
        assert run["model"] == "mlp" and run["dataset"] == "teacher" and run["epochs"] == 2
        assert 0.0 <= run["test_accuracy"] <= 1.0 and run["wall_time_s"] > 0
        assert [row["epoch"] for row in run["history"]] == [1, 2]
        assert all(ROW_KEYS <= set(row) for row in run["history"])
        assert run["test_loss"] == run["history"][-1]["test_loss"]
    assert results["runs"][0]["lr"] == 0.2
    assert results["config"]["optimizers"] == ["sgd", "adam"]
    assert (tmp_path / "out" / "loss_vs_time.png").stat().st_size > 0
    assert (tmp_path / "out" / "accuracy_vs_epoch.png").stat().st_size > 0
    stdout = capsys.readouterr().out
    assert "summary" in stdout and "to_target_s" in stdout


def test_runs_share_init_and_batch_order(tmp_path):
    alone = compare(tmp_path / "a", *TINY, "--optimizers", "sgd", "--seed", "3")
    second = compare(tmp_path / "b", *TINY, "--optimizers", "adam,sgd", "--seed", "3")
    losses = [(r["train_loss"], r["test_loss"]) for r in alone["runs"][0]["history"]]
    assert losses == [(r["train_loss"], r["test_loss"]) for r in second["runs"][1]["history"]]


def test_autoencoder_reports_reconstruction(tmp_path, capsys):
    results = compare(
        tmp_path, "--model", "autoencoder", "--hidden", "16,4", "--epochs", "1",
        "--optimizers", "adam", "--limit-train", "64", "--limit-test", "32", "--no-progress",
    )
    (run,) = results["runs"]
    assert run["test_accuracy"] is None and run["time_to_target_s"] is None
    assert run["test_loss"] > 0 and run["history"][0]["test_accuracy"] is None
    assert results["config"]["train_size"] == 64
    assert (tmp_path / "out" / "test_loss_vs_epoch.png").exists()
    assert "test_recon_loss" in capsys.readouterr().out


def test_save_model_round_trip(tmp_path):
    path = tmp_path / "ckpt" / "model.pt"
    results = compare(tmp_path, *TINY, "--optimizers", "sgd", "--save-model", str(path))
    saved = tmp_path / "ckpt" / "model-sgd.pt"
    assert results["runs"][0]["checkpoint"] == str(saved)
    model, ckpt = load_checkpoint(saved)
    assert ckpt["model"] == "mlp" and ckpt["dataset"] == "teacher" and ckpt["hidden"] == [16]
    assert model(torch.randn(3, 20)).shape == (3, 4)


@pytest.mark.parametrize("flag", ["--help"])
def test_help_exits_zero(flag, capsys):
    assert main(["compare", flag]) == 0
    assert "--optimizers" in capsys.readouterr().out


def test_track_curvature_records_trace_and_top_eigenvalue(tmp_path):
    results = compare(tmp_path, *TINY, "--optimizers", "sgd", "--track-curvature")
    curvature = results["runs"][0]["curvature"]
    assert [c["epoch"] for c in curvature] == [1, 2]
    for c in curvature:
        assert c["trace"] >= c["top_eigenvalue"] > 0
        assert c["residual"] < 1e-2
    assert (tmp_path / "out" / "curvature_vs_epoch.png").stat().st_size > 0


@pytest.mark.parametrize("name", ["kfac", "pkfac", "rkfac"])
def test_kfac_family_runs_in_compare(tmp_path, name):
    results = compare(tmp_path, *TINY, "--optimizers", name)
    run = results["runs"][0]
    assert run["optimizer"] == name and not run["diverged"]
    assert run["train_loss"] < run["history"][0]["train_loss"] * 1.5
