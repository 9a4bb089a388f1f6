"""``natgrad bench capacity`` at tiny widths: one child process per configuration, the JSON
rows, the budgets (a run stopped for time, one for memory, a failure) and the input errors.

Each child imports torch (a few seconds), so the runs here share as few children as they can.
"""

from __future__ import annotations

import json

import pytest
import torch

from natgrad.bench.capacity import (
    EVERY,
    CapacityConfig,
    Job,
    format_capacity,
    optimizer_state_bytes,
    resolve_optimizer,
    run_capacity,
    watch_job,
)
from natgrad.bench.capacity import _row as capacity_row
from natgrad.cli.main import main
from natgrad.data import dataset_info
from natgrad.models import build_model
from natgrad.optim.registry import make_optimizer

ROW_KEYS = {"model", "width", "params", "optimizer", "status", "first_step_s",
            "step_time_s_median", "sgd_step_time_s_median", "peak_rss_bytes", "state_bytes",
            "state_fraction", "ratio_to_sgd", "note", "error"}
MLP32_PARAMS = 784 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10


@pytest.fixture(scope="module")
def mlp_doc(tmp_path_factory):
    out = tmp_path_factory.mktemp("capacity")
    cfg = CapacityConfig(widths=(32,), cnn_channels=None,
                         optimizers=("adam", "sgd", "kfac"), steps=3, warmup=1,
                         threads=1)
    return run_capacity(cfg, out, progress=False), out


def test_rows_schema_and_files(mlp_doc):
    doc, out = mlp_doc
    assert json.loads((out / "capacity.json").read_text()) == doc
    assert (out / "capacity.png").stat().st_size > 0
    assert [r["optimizer"] for r in doc["rows"]] == ["adam", "sgd", "kfac"]
    meta = doc["meta"]
    assert meta["time_budget_s"] == 600 and meta["memory_budget_gib"] == 20
    assert meta["torch_threads"] == 1 and meta["machine"]["cpu_count"] >= 1
    sgd = doc["rows"][1]["step_time_s_median"]
    for r in doc["rows"]:
        assert ROW_KEYS <= set(r)
        assert r["status"] == "ok" and r["error"] is None, r
        assert r["params"] == MLP32_PARAMS and r["width"] == 32
        assert r["first_step_s"] > 0 and len(r["step_times_s"]) == 3 and r["steps_done"] == 5
        assert r["sgd_step_time_s_median"] == sgd
        assert r["ratio_to_sgd"] == pytest.approx(r["step_time_s_median"] / sgd)
        assert r["peak_rss_bytes"] > r["base_rss_bytes"] > 0
        assert r["state_fraction"] == pytest.approx(r["state_bytes"] / (4 * r["params"]))
    table = format_capacity(doc)
    assert "kfac" in table and "600 s of steps" in table


def test_state_bytes_per_optimizer(mlp_doc):
    rows = {r["optimizer"]: r for r in mlp_doc[0]["rows"]}
    assert rows["adam"]["state_bytes"] == 2 * MLP32_PARAMS * 4  # exp_avg + exp_avg_sq
    assert rows["sgd"]["state_bytes"] == MLP32_PARAMS * 4  # the momentum buffer
    assert rows["kfac"]["state_bytes"] > 785**2 * 4  # the dense 785 x 785 input factor


def test_state_bytes_counts_factors_in_process():
    torch.manual_seed(0)
    model = build_model("mlp", dataset_info("mnist5k"), (40,))
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    params = sum(p.numel() for p in model.parameters())
    for name in ("kfac", "pkfac"):
        opt = make_optimizer(name, model, momentum=0.9)
        assert optimizer_state_bytes(opt) == sum(opt.memory_usage().values()) > 0  # factors
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        factors = sum(opt.memory_usage().values())
        assert optimizer_state_bytes(opt) == factors + 4 * params  # + the momentum buffers


def test_every_variant_uses_the_registry_factory():
    assert resolve_optimizer("pkfac-every") == ("pkfac", EVERY)
    assert resolve_optimizer("adam") == ("adam", {})
    model = build_model("mlp", dataset_info("mnist5k"), (40,))
    name, kwargs = resolve_optimizer("pkfac-every")
    opt = make_optimizer(name, model, **kwargs)
    assert (opt.curvature_every, opt.inverse_every, opt.strategy) == (1, 1, "projected")
    assert opt.factor_decay == 0.8  # the rest of pkfac's schedule is kept
    with pytest.raises(ValueError, match="accepted: .*pkfac-every"):
        resolve_optimizer("sgd-every")


def test_time_budget_stops_the_run_and_skips_larger_widths(tmp_path):
    cfg = CapacityConfig(widths=(64, 32), cnn_channels=None, optimizers=("kfac",),
                         steps=10**7, warmup=0, threads=1, time_budget_s=1.0)
    doc = run_capacity(cfg, tmp_path, progress=False)
    small, large = doc["rows"]
    assert (small["width"], large["width"]) == (32, 64)
    assert small["status"] == "out_of_time" and not small["skipped"]
    assert small["first_step_s"] > 0 and small["steps_done"] >= 2
    assert small["step_time_s_median"] is None and small["peak_rss_bytes"] > 0
    assert large["status"] == "out_of_time" and large["skipped"]
    assert large["note"] == "skipped: out_of_time at w=32" and large["first_step_s"] is None


def test_memory_budget_stops_the_run(tmp_path):
    cfg = CapacityConfig(widths=(32,), cnn_channels=None, optimizers=("sgd",), steps=3,
                         warmup=0, memory_budget_gib=0.05)
    (row,) = run_capacity(cfg, tmp_path, progress=False)["rows"]
    assert row["status"] == "out_of_memory", row
    assert row["peak_rss_bytes"] > 0.05 * 2**30 and row["first_step_s"] is None
    assert "0.05 GiB memory budget" in row["note"]
    assert json.loads((tmp_path / "capacity.json").read_text())["rows"][0]["status"] == (
        "out_of_memory")


def test_a_failing_child_is_recorded():
    job = Job("mlp", (32, 32), "no-such-optimizer", steps=1, warmup=0, batch=16, threads=1,
              seed=0)
    row = capacity_row(job, MLP32_PARAMS, watch_job(job, 60.0, 2**34), 16.0)
    assert row["status"] == "failed"
    assert "unknown optimizer 'no-such-optimizer'" in row["error"]
    assert row["first_step_s"] is None and row["state_bytes"] is None


def test_cli_json_with_the_cnn(tmp_path, capsys):
    rc = main(["bench", "capacity", "--widths", "32", "--cnn-channels", "4,8", "--optimizers",
               "pkfac-every", "--steps", "2", "--warmup", "0", "--threads", "1", "--json",
               "--out", str(tmp_path)])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == json.loads((tmp_path / "capacity.json").read_text())
    assert [(r["model"], r["width"], r["status"]) for r in doc["rows"]] == [
        ("mlp", 32, "ok"), ("widecnn", 8, "ok")]
    mlp, cnn = doc["rows"]
    assert 0 < mlp["state_fraction"] < 1  # rank-24 bases: less than SGD's momentum buffer
    assert cnn["params"] == sum(p.numel() for p in build_model(
        "widecnn", dataset_info("mnist5k"), (4, 8)).parameters())
    assert cnn["ratio_to_sgd"] is None and cnn["sgd_step_time_s_median"] is None
    assert doc["meta"]["command"].startswith("natgrad bench capacity --widths 32 "
                                             "--cnn-channels 4,8 --optimizers pkfac-every")


@pytest.mark.parametrize("argv, match", [
    (["--widths", "0"], "--widths"),
    (["--widths", "8,8"], "--widths"),
    (["--cnn-channels", "a"], "--cnn-channels"),
    (["--optimizers", "sgd,lbfgs"], "--optimizers: unknown optimizer 'lbfgs'"),
    (["--optimizers", "sgd-every"], "--optimizers"),
    (["--steps", "0"], "--steps"),
    (["--warmup", "-1"], "--warmup"),
    (["--time-budget", "0"], "--time-budget"),
    (["--time-budget", "nan"], "--time-budget"),
    (["--memory-budget", "-2"], "--memory-budget"),
    (["--threads", "0"], "--threads"),
])
def test_bad_input_is_one_line_exit_2(argv, match, capsys, tmp_path):
    assert main(["bench", "capacity", *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err
    assert not (tmp_path / "o").exists()


def test_config_validates_once():
    with pytest.raises(ValueError, match="optimizers"):
        CapacityConfig(optimizers=())
    with pytest.raises(ValueError, match="memory_budget_gib"):
        CapacityConfig(memory_budget_gib=float("inf"))
    with pytest.raises(ValueError, match="cnn_channels"):
        CapacityConfig(cnn_channels=())
    jobs = CapacityConfig(widths=(64, 32), optimizers=("kfac", "sgd")).jobs()
    assert [(j.model, j.width, j.optimizer) for j in jobs] == [
        ("mlp", 32, "sgd"), ("mlp", 32, "kfac"), ("mlp", 64, "sgd"), ("mlp", 64, "kfac"),
        ("widecnn", 512, "sgd"), ("widecnn", 512, "kfac")]
