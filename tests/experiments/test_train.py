"""The training loop, evaluation and loss kinds."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from natgrad.data import load_dataset
from natgrad.experiments.train import TrainConfig, evaluate, train
from natgrad.losses import LOSSES, get_loss
from natgrad.models import build_model
from natgrad.optim import make_optimizer


@pytest.fixture(scope="module")
def teacher():
    return load_dataset("teacher")


def _run(teacher, seed=0, epochs=3, callbacks=(), target=0.5):
    train_set, test_set = teacher
    torch.manual_seed(seed)
    model = build_model("mlp", train_set.info, hidden=(32,))
    opt = make_optimizer("sgd", model, lr=0.1)
    cfg = TrainConfig(epochs=epochs, batch_size=64, seed=seed, progress=False,
                      target_accuracy=target)
    return model, train(model, opt, train_set, test_set, "cross_entropy", cfg, callbacks)


def test_history_and_timing(teacher):
    _, result = _run(teacher)
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    times = [r["time_s"] for r in result.history]
    assert times == sorted(times) and math.isclose(times[-1], result.wall_time_s)
    assert len(result.step_times_s) == 3 * math.ceil(2000 / 64)
    assert 0 < result.step_time_s_median < result.wall_time_s
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.time_to_target_s in times  # reached at an epoch end
    assert not result.diverged


def test_same_seed_same_history(teacher):
    _, a = _run(teacher, seed=1)
    _, b = _run(teacher, seed=1)
    _, c = _run(teacher, seed=2)
    key = [(r["train_loss"], r["test_loss"]) for r in a.history]
    assert key == [(r["train_loss"], r["test_loss"]) for r in b.history]
    assert key != [(r["train_loss"], r["test_loss"]) for r in c.history]


def test_callbacks_see_train_mode(teacher):
    calls = []

    def callback(epoch, model, row):
        calls.append((epoch, model.training, row["test_accuracy"]))

    _run(teacher, epochs=2, callbacks=[callback])
    assert [c[:2] for c in calls] == [(1, True), (2, True)]


def test_target_never_reached(teacher):
    _, result = _run(teacher, epochs=1, target=1.0)
    assert result.time_to_target_s is None


def test_evaluate_restores_mode_and_counts(teacher):
    model = nn.Sequential(nn.Flatten(), nn.Linear(20, 4))
    model.eval()
    loss, acc = evaluate(model, teacher[1], "cross_entropy", batch_size=7)
    assert not model.training and 0.0 <= acc <= 1.0
    logits = model(teacher[1].x)
    torch.testing.assert_close(
        loss, torch.nn.functional.cross_entropy(logits, teacher[1].y).item(), rtol=1e-5, atol=0
    )


def test_divergence_stops(teacher):
    train_set, test_set = teacher
    model = nn.Sequential(nn.Linear(20, 4))
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = TrainConfig(epochs=5, batch_size=100, progress=False)
    result = train(model, opt, train_set, test_set, "cross_entropy", cfg)
    assert result.diverged and len(result.history) == 1
    assert len(result.step_times_s) == 1 and math.isnan(result.history[0]["train_loss"])


def test_config_validation():
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=-1)


def test_reconstruction_loop_runs():
    x = torch.rand(64, 1, 28, 28)
    data = TensorDataset(x, x.reshape(64, -1))
    torch.manual_seed(0)
    model = build_model("autoencoder", load_dataset("mnist5k")[0].info, hidden=(16, 4))
    opt = make_optimizer("adam", model, loss_kind="bce")
    result = train(model, opt, data, data, "bce", TrainConfig(epochs=2, batch_size=32,
                                                               progress=False))
    assert result.history[-1]["test_accuracy"] is None
    assert result.time_to_target_s is None


def test_losses_are_batch_means_of_per_sample_nll():
    torch.manual_seed(0)
    out, target = torch.randn(5, 7), torch.rand(5, 7)
    per_sample = nn.functional.binary_cross_entropy_with_logits(out, target, reduction="none")
    torch.testing.assert_close(get_loss("bce").fn(out, target), per_sample.sum(1).mean())
    torch.testing.assert_close(get_loss("mse").fn(out, target),
                               0.5 * (out - target).pow(2).sum(1).mean())
    with pytest.raises(ValueError, match="accepted: cross_entropy, bce, mse"):
        get_loss("hinge")


@pytest.mark.parametrize("kind", list(LOSSES))
def test_losses_agree_with_likelihoods(kind):
    likelihoods = pytest.importorskip("natgrad.likelihoods")
    torch.manual_seed(0)
    out = torch.randn(6, 4)
    target = torch.randint(0, 4, (6,)) if kind == "cross_entropy" else torch.rand(6, 4)
    nll = likelihoods.get_likelihood(kind).nll(out, target)
    torch.testing.assert_close(get_loss(kind).fn(out, target), nll.mean())
