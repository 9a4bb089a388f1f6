"""Smoke tests of ``natgrad bench scaling`` / ``stability`` at tiny sizes; their input errors."""

from __future__ import annotations

import json

import pytest

from natgrad.bench.scaling import ScalingConfig, _slope, run_scaling
from natgrad.cli.main import main


def test_scaling_writes_json_plot_and_slopes(tmp_path, capsys):
    rc = main(["bench", "scaling", "--widths", "16,32", "--ranks", "4,8", "--repeats", "2",
               "--out", str(tmp_path), "--no-progress", "--threads", "1"])
    assert rc == 0
    doc = json.loads((tmp_path / "scaling.json").read_text())
    assert (tmp_path / "scaling.png").stat().st_size > 0
    assert {r["strategy"] for r in doc["results"]} == {"eigh", "cholesky", "recursive", "projected"}
    assert len(doc["results"]) == 2 * 5
    for r in doc["results"]:
        assert {"strategy", "width", "rank", "batch", "update_time_s", "precondition_time_s",
                "state_bytes"} <= set(r)
        assert r["update_time_s"] > 0 and r["state_bytes"] > 0
    assert set(doc["slopes"]) == {"eigh", "cholesky", "recursive", "projected", "projected_r4",
                                  "projected_r8"}
    assert doc["slopes"]["projected"] == doc["slopes"]["projected_r8"]
    out = capsys.readouterr().out
    assert "log-log slopes" in out and "projected r=4" in out


def test_projected_state_is_linear_in_width():
    doc = run_scaling(ScalingConfig(widths=(40, 80), ranks=(4,), strategies=("projected", "eigh"),
                                    repeats=1, batch=8), progress=False)
    proj = {r["width"]: r["state_bytes"] for r in doc["results"] if r["strategy"] == "projected"}
    eigh = {r["width"]: r["state_bytes"] for r in doc["results"] if r["strategy"] == "eigh"}
    assert proj == {d: (d * 4 + 4) * 4 for d in (40, 80)}  # U and λ, float32
    assert eigh[80] > 3.9 * eigh[40]


def test_slope_fit():
    assert _slope([1, 2, 4], [3, 12, 48]) == pytest.approx(2.0)


def test_stability_runs_and_reports(tmp_path, capsys):
    rc = main(["bench", "stability", "--dampings", "1e-1,1e-6", "--seeds", "0",
               "--limit-train", "256", "--limit-test", "100", "--batch-size", "64",
               "--rank", "8", "--out", str(tmp_path), "--no-progress", "--threads", "1"])
    assert rc == 0
    doc = json.loads((tmp_path / "stability.json").read_text())
    assert len(doc["results"]) == 3 * 2
    for r in doc["results"]:
        assert {"optimizer", "damping", "seed", "diverged", "final_train_loss",
                "test_accuracy"} <= set(r)
    assert not any(r["diverged"] for r in doc["results"] if r["damping"] == 0.1)
    assert "diverged" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, match",
    [
        (["scaling", "--widths", "0"], "--widths"),
        (["scaling", "--widths", "a,b"], "--widths"),
        (["scaling", "--ranks", "-3"], "--ranks"),
        (["scaling", "--strategies", "svd"], "strategy"),
        (["scaling", "--repeats", "0"], "--repeats"),
        (["stability", "--dampings", "0"], "--dampings"),
        (["stability", "--optimizers", "adam"], "optimizer"),
        (["stability", "--epochs", "0"], "--epochs"),
        (["stability", "--seeds", "x"], "--seeds"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, match, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err


def test_bench_needs_a_benchmark(capsys):
    assert main(["bench"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
