"""natgrad race: the protocol's pieces (tuning settings, time to target, ratios, the KL-clip
count) and a smoke race through the command line."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

import natgrad
from natgrad.bench.race import (
    SMOKE,
    RaceConfig,
    clip_bound_fraction,
    summarize,
    to_target,
    trial_settings,
)
from natgrad.cli.main import main


def test_trials_start_at_the_default_and_stay_in_the_space():
    settings = trial_settings("pkfac", 5, 0.1)
    assert settings[0] == {"lr": 0.1, "kl_clip": 1e-3, "damping": 1e-2}
    assert settings[1] == {"lr": 0.1, "kl_clip": "relative", "damping": 1e-2}
    assert settings == trial_settings("pkfac", 5, 0.1)  # the same budget on every run
    for s in settings[2:]:
        assert set(s) == {"lr", "kl_clip", "damping"}
        assert 1e-2 <= s["lr"] <= 1.0 and 1e-4 <= s["kl_clip"] <= 1.0
    assert trial_settings("muon", 2, 0.02)[0] == {"lr": 0.02, "adamw_lr": 3e-4}


def test_time_to_target_and_ratios_to_adamw():
    assert to_target([[0, 0.0, 3.0], [10, 1.0, 2.5], [20, 2.0, 2.0]], 2.5) == (10, 1.0)
    assert to_target([[0, 0.0, 3.0]], 2.5) == (None, None)
    assert to_target([[0, 0.0, 2.0], [10, 1.0, 2.4]], 2.5) == (10, 1.0)  # a run must train

    def run(curve, val=2.0):
        return {"curve": curve, "final_validation_loss": val, "final_test_loss": val,
                "step_ms": 1.0, "clip_bound_fraction": None}

    cfg = RaceConfig(optimizers=("adamw", "sgd"), seeds=(0, 1))
    seeds = {0: {"adamw": run([[0, 0, 3], [10, 4.0, 2.2]]), "sgd": run([[0, 0, 3], [5, 1.0, 2.1]])},
             1: {"adamw": run([[0, 0, 3], [10, 4.0, 2.0]]), "sgd": run([[0, 0, 3], [5, 2.0, 2.6]])}}
    summ = summarize(cfg, seeds)
    assert summ["target"] == 2.2  # AdamW's last validation loss, the highest over seeds
    sgd = summ["optimizers"]["sgd"]
    assert sgd["reached"] == 1 and sgd["own_s_to_target"]["mean"] is None  # seed 1: never
    adamw = summ["optimizers"]["adamw"]
    assert adamw["reached"] == 2 and adamw["speedup_vs_adamw_time"]["mean"] == 1.0
    summ = summarize(cfg, seeds, target=2.7)
    assert summ["optimizers"]["sgd"]["speedup_vs_adamw_time"] == {
        "mean": 3.0, "min": 2.0, "max": 4.0, "n": 2}  # AdamW 4 s against 1 s and 2 s
    assert "speedup_vs_muon_time" not in summ["optimizers"]["sgd"]  # Muon not raced


def test_ratios_to_muon_when_it_is_raced():
    def run(curve):
        return {"curve": curve, "final_validation_loss": 2.0, "final_test_loss": 2.0,
                "step_ms": 1.0, "clip_bound_fraction": None}

    cfg = RaceConfig(optimizers=("adamw", "muon", "sgd"), seeds=(0, 1))
    seeds = {s: {"adamw": run([[0, 0, 3], [10, 4.0, 2.0]]),
                 "muon": run([[0, 0, 3], [5, 2.0, 2.0]]),
                 "sgd": run([[0, 0, 3], [4, 1.0 + s, 2.0]])} for s in (0, 1)}
    sgd = summarize(cfg, seeds, target=2.5)["optimizers"]["sgd"]
    assert sgd["speedup_vs_muon_time"] == {"mean": 1.5, "min": 1.0, "max": 2.0, "n": 2}
    assert sgd["speedup_vs_muon_steps"]["mean"] == 1.25  # Muon 5 steps against 4
    assert sgd["speedup_vs_adamw_time"]["max"] == 4.0


@pytest.mark.parametrize("kl_clip, bound", [(1e-8, 1.0), (1e6, 0.0)])
def test_the_clip_share_is_the_optimizers_own_count(kl_clip, bound):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = natgrad.KFAC(model, lr=0.1, kl_clip=kl_clip)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    assert clip_bound_fraction(opt) is None  # no step counted yet
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the clip deciding every step is said once
        for _ in range(3):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert opt.diagnostics()["kl_clip"]["steps"] == 3 and clip_bound_fraction(opt) == bound


@pytest.mark.parametrize("make", [lambda m: natgrad.EigenAdam(m), lambda m: natgrad.KFAC(
    m, kl_clip=None)])
def test_without_a_clip_the_share_is_zero(make):
    """EigenAdam (Adam sets the step length) and K-FAC with ``kl_clip=None``: the learning rate
    sets every step, which the race's JSON says as 0, not as "not counted"."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    assert clip_bound_fraction(make(model)) == 0.0


@pytest.mark.parametrize("kw, match", [
    ({"optimizers": ("sgd",)}, "without adamw"),
    ({"optimizers": ("adamw", "rkfac")}, "no tuning space"),
    ({"steps": 0}, "steps must be a positive integer"),
    ({"target": -1.0}, "target must be a positive number"),
])
def test_bad_config_is_named(kw, match):
    with pytest.raises(ValueError, match=match):
        RaceConfig(**kw)


def test_smoke_race_through_the_command_line(tmp_path, capsys):
    assert main(["race", "--smoke", "--quiet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "target validation loss" in out and "clip bound" in out
    doc = json.loads((tmp_path / "race.json").read_text())
    assert doc["config"]["steps"] == SMOKE.steps and set(doc["tuning"]) == set(SMOKE.optimizers)
    for t in doc["tuning"].values():
        assert len(t["trials"]) == SMOKE.trials and t["picked"] in [r["setting"] for r in
                                                                     t["trials"]]
    for run in doc["seeds"].values():
        for r in run.values():
            steps = [c[0] for c in r["curve"]]
            assert steps[0] == 0 and steps[-1] == SMOKE.steps
            own = [c[1] for c in r["curve"]]
            assert own == sorted(own) and math.isclose(own[-1], r["own_s"])
    summ = doc["summary"]["optimizers"]
    assert summ["pkfac"]["clip_bound_fraction"] is not None
    assert summ["adamw"]["clip_bound_fraction"] is None
    assert summ["adamw"]["reached"] == len(SMOKE.seeds)


def test_command_line_errors_come_before_work(tmp_path, capsys):
    assert main(["race", "--optimizers", "adamw,nope", "--out", str(tmp_path)]) == 2
    assert "unknown optimizer 'nope'" in capsys.readouterr().err
    assert main(["race", "--steps", "0", "--out", str(tmp_path)]) == 2
    assert "--steps must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "race.json").exists()


def test_the_clip_share_of_a_paired_optimizer_is_its_preconditioners():
    class Counted:
        def diagnostics(self):
            return {"kl_clip": {"steps": 4, "bound": 1, "fraction": 0.25}}

    class Paired:
        preconditioner = Counted()

    assert clip_bound_fraction(Counted()) == 0.25
    assert clip_bound_fraction(Paired()) == 0.25
    assert clip_bound_fraction(object()) is None
