"""natgrad.bench.steps: optimizers taking turns on one model (no timing is asserted)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from natgrad.bench.steps import StepConfig, interleaved_step_times
from natgrad.cli.main import main


def test_ratios_are_per_round_and_the_reference_is_one():
    doc = interleaved_step_times(StepConfig("mlp", "mnist5k", ("sgd", "pkfac"), hidden=(16,),
                                            rounds=4, warmup=1, batch_size=16))
    assert doc["params"] == 784 * 16 + 16 + 16 * 10 + 10
    ref, other = doc["runs"]
    assert ref["optimizer"] == "sgd" and ref["ratio_median"] == 1.0
    assert ref["ratio_quartiles"] == [1.0, 1.0]
    lo, hi = other["ratio_quartiles"]
    assert lo <= other["ratio_median"] <= hi and other["step_time_s_median"] > 0
    assert doc["rounds"] == 4 and doc["config"]["optimizers"] == ["sgd", "pkfac"]


def test_taking_turns_does_not_change_a_trajectory(monkeypatch):
    """Each optimizer trains its own copy: the SGD model after the rounds is the model SGD
    trains alone on the same batches."""
    import natgrad.bench.steps as steps

    built = []
    real = copy.deepcopy
    monkeypatch.setattr(steps.copy, "deepcopy", lambda m: built.append(real(m)) or built[-1])
    cfg = StepConfig("mlp", "mnist5k", ("sgd", "kfac"), rounds=3, warmup=1, batch_size=8)
    interleaved_step_times(cfg)
    sgd_model = built[0]

    from natgrad.data import load_dataset
    from natgrad.models import build_model
    from natgrad.optim import make_optimizer

    train, _ = load_dataset("mnist5k")
    torch.manual_seed(cfg.seed)
    alone = build_model("mlp", train.info)
    opt = make_optimizer("sgd", alone, lr=0.05)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(train.x), generator=gen)
    for r in range(4):
        idx = order[r * 8:(r + 1) * 8]
        loss = torch.nn.functional.cross_entropy(alone(train.x[idx]), train.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for a, b in zip(alone.parameters(), sgd_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kw, match", [
    ({"optimizers": ("sgd",)}, "at least two"),
    ({"optimizers": ("sgd", "sgd")}, "at least two distinct"),
    ({"rounds": 0}, "rounds must be a positive integer"),
    ({"warmup": -1}, "warmup must be a non-negative integer"),
    ({"model": "resnet8", "hidden": (8,)}, "takes no hidden widths"),
    ({"model": "transformer"}, "needs a token-sequence data set"),
])
def test_invalid_config(kw, match):
    base = {"model": "mlp", "data": "mnist5k", "optimizers": ("sgd", "kfac")}
    with pytest.raises(ValueError, match=match):
        StepConfig(**{**base, **kw})


def test_cli(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        assert main(["bench", "steps", "--model", "transformer", "--optimizers", "sgd,pkfac",
                     "--rounds", "2", "--warmup", "0", "--batch-size", "8", "--threads", "1",
                     "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "transformer (102,152 parameters) on majority" in out and "step / sgd (IQR)" in out
    doc = json.loads((tmp_path / "steps.json").read_text())
    assert [r["optimizer"] for r in doc["runs"]] == ["sgd", "pkfac"]
    assert main(["bench", "steps", "--optimizers", "sgd", "--out", str(tmp_path)]) == 2
    assert "at least two" in capsys.readouterr().err
