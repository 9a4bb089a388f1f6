"""The optimizer registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from natgrad.optim import OPTIMIZERS, make_optimizer
from natgrad.optim.registry import OptimizerSpec


def test_sgd_and_adam_defaults():
    model = nn.Linear(3, 2)
    sgd = make_optimizer("sgd", model)
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["lr"] == OPTIMIZERS["sgd"].default_lr and sgd.defaults["momentum"] == 0.9
    adam = make_optimizer("adam", model, lr=0.01, weight_decay=1e-4)
    assert isinstance(adam, torch.optim.Adam)
    assert adam.defaults["lr"] == 0.01 and adam.defaults["weight_decay"] == 1e-4
    assert make_optimizer("sgd", model, loss_kind="bce").defaults["lr"] == OPTIMIZERS[
        "sgd"
    ].lr_for("bce")


def test_param_groups_are_passed_through():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    groups = [{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": 0.5}]
    opt = make_optimizer("sgd", model, lr=0.1, params=groups)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.5]


def test_unknown_name_lists_accepted():
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'; accepted: sgd, adam"):
        make_optimizer("lbfgs", nn.Linear(1, 1))


def test_bad_lr():
    with pytest.raises(ValueError, match="learning rate"):
        make_optimizer("adam", nn.Linear(1, 1), lr=-1.0)


def test_adding_an_entry(monkeypatch):
    seen = {}

    def factory(model, params, lr, loss_kind, **kw):
        seen.update(model=model, loss_kind=loss_kind)
        return torch.optim.SGD(params, lr=lr)

    monkeypatch.setitem(OPTIMIZERS, "mine", OptimizerSpec(factory, default_lr=0.3))
    model = nn.Linear(2, 2)
    opt = make_optimizer("mine", model, loss_kind="mse")
    assert opt.defaults["lr"] == 0.3 and seen == {"model": model, "loss_kind": "mse"}
