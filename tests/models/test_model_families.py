"""The ResNet and the causal transformer: every parameter preconditioned, and they train with
natgrad.KFAC (every Fisher type) and with the preconditioner in front of AdamW."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import natgrad
from natgrad.data import dataset_info, load_dataset
from natgrad.losses import get_loss
from natgrad.models import MODELS, build_model, default_dataset, loss_kind
from natgrad.optim import make_optimizer


def _coverage(opt) -> float:
    covered = {id(p) for h in opt.layers.values() for p in h.params}
    params = [p for p in opt.curvature.model.parameters()]
    return sum(p.numel() for p in params if id(p) in covered) / sum(p.numel() for p in params)


@pytest.mark.parametrize("name, data", [("resnet8", "mnist5k"), ("transformer", "majority")])
def test_every_parameter_is_preconditioned(name, data):
    torch.manual_seed(0)
    model = build_model(name, dataset_info(data))
    opt = natgrad.KFAC(model)
    assert _coverage(opt) == 1.0
    assert "plain step" not in opt.registration_summary
    assert "parameters with the plain" not in opt.registration_summary


@pytest.mark.parametrize("fisher", ["mc", "empirical", "exact"])
def test_transformer_trains_with_every_fisher(fisher):
    torch.manual_seed(0)
    train, _ = load_dataset("majority")
    model = build_model("transformer", train.info)
    opt = natgrad.KFAC(model, lr=0.1, fisher=fisher, loss_reduction="mean", inverse_every=2)
    x, y = train.x[:24], train.y[:24]
    losses = []
    for _ in range(6):
        out = model(x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(v == 6 for v in opt.curvature.updates.values())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", list(MODELS))
def test_pkfac_in_front_of_adamw_trains_every_model_of_the_registry(name):
    torch.manual_seed(0)
    train, _ = load_dataset(default_dataset(name))
    model = build_model(name, train.info, hidden=(16, 4) if name == "autoencoder" else None)
    kind = loss_kind(name)
    opt = make_optimizer("pkfac+adamw", model, lr=3e-3, loss_kind=kind)
    x, y = train.x[:32], train.y[:32]
    target = x.reshape(len(x), -1) if MODELS[name].reconstruct else y
    losses = []
    for _ in range(12):
        loss = get_loss(kind).fn(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert min(opt.preconditioner.curvature.updates.values()) == 2  # steps 0 and 10


def test_majority_targets_are_the_running_mode():
    train, test = load_dataset("majority")
    assert train.x.shape == (4000, 16) and test.x.shape == (1000, 16)
    for n in range(20):  # brute force: the most frequent value so far, the smallest on ties
        for t in range(16):
            counts = torch.bincount(train.x[n, : t + 1], minlength=8)
            assert int(train.y[n, t]) == int((counts == counts.max()).nonzero()[0])
    assert train.x.dtype == torch.int64 and train.info.is_sequence
    with pytest.raises(ValueError, match="token-sequence"):
        build_model("transformer", dataset_info("mnist5k"))
    with pytest.raises(ValueError, match="non-sequence"):
        build_model("mlp", dataset_info("majority"))
