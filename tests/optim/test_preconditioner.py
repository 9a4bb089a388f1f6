"""Preconditioner mode: natgrad.KFAC writes its direction into .grad for another optimizer."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad.optim import PreconditionedOptimizer, make_optimizer


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)).double()


def _batches(n: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("factors", ["eigh", "projected"])
def test_written_gradient_is_the_kfac_direction(factors):
    kw = dict(lr=0.1, factors=factors, inverse_every=2, kl_clip=1e-2,
              factor_options={"rank": 3} if factors == "projected" else None)
    m1, m2 = _model(), _model()
    kfac = natgrad.KFAC(m1, **kw)
    pre = natgrad.KFAC(m2, preconditioner=True, **kw)
    sgd = torch.optim.SGD(m2.parameters(), lr=0.1)
    for x, y in _batches():
        for model, opt in ((m1, kfac), (m2, pre)):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
        before = [p.detach().clone() for p in m1.parameters()]
        kfac.step()
        pre.step()  # writes .grad, leaves the parameters alone
        for p, q, b in zip(m1.parameters(), m2.parameters(), before):
            torch.testing.assert_close((b - p.detach()) / 0.1, q.grad, rtol=1e-9, atol=1e-12)
        sgd.step()
        for p, q in zip(m1.parameters(), m2.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_preconditioner_refuses_momentum_and_weight_decay():
    with pytest.raises(ValueError, match="momentum"):
        natgrad.KFAC(_model(), preconditioner=True, momentum=0.9)
    with pytest.raises(ValueError, match="weight_decay"):
        natgrad.KFAC(_model(), preconditioner=True, weight_decay=1e-4)
    with pytest.raises(ValueError, match="preconditioner=True"):
        PreconditionedOptimizer(natgrad.KFAC(_model()), torch.optim.SGD(_model().parameters()))


def test_pkfac_adamw_trains_schedules_and_checkpoints(train):
    model = _model()
    opt = make_optimizer("pkfac+adamw", model, lr=1e-2, loss_kind="cross_entropy")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    batches = _batches(8)
    losses = train(model, opt, batches[:4], sched)
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5)
    assert opt.preconditioner.curvature.updates["0"] == 1  # pkfac's schedule: every 10 steps
    buffer = io.BytesIO()
    torch.save((model.state_dict(), opt.state_dict()), buffer)  # a real checkpoint
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    rest = train(model, opt, batches[4:])
    clone = _model(seed=5)
    clone.load_state_dict(saved[0])
    opt2 = make_optimizer("pkfac+adamw", clone, lr=1e-2, loss_kind="cross_entropy")
    opt2.load_state_dict(saved[1])
    assert train(clone, opt2, batches[4:]) == rest
    assert losses[0] > rest[-1]


def test_scheduler_follows_the_inner_optimizer_after_a_load(train):
    """A load replaces the inner optimizer's groups; a scheduler made before it must still act
    on the groups that take the step (the usual resume: make, schedule, load, load)."""
    model = _model()
    opt = make_optimizer("pkfac+adamw", model, lr=1e-2, loss_kind="cross_entropy")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train(model, opt, _batches(2), sched)
    saved = (opt.state_dict(), sched.state_dict())
    opt2 = make_optimizer("pkfac+adamw", model, lr=1e-2, loss_kind="cross_entropy")
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    opt2.load_state_dict(saved[0])
    sched2.load_state_dict(saved[1])
    assert opt2.param_groups is opt2.optimizer.param_groups
    assert opt2.state is opt2.optimizer.state
    train(model, opt2, _batches(1), sched2)
    assert opt2.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** 3)


def test_failed_preconditioner_load_leaves_the_inner_optimizer_alone(train, monkeypatch):
    model = _model()
    opt = make_optimizer("pkfac+adamw", model, lr=1e-2, loss_kind="cross_entropy")
    train(model, opt, _batches(2))
    other = make_optimizer("pkfac+adamw", _model(seed=3), lr=3e-2, loss_kind="cross_entropy")
    before = copy.deepcopy(opt.optimizer.state_dict())

    def broken(state):
        raise RuntimeError("preconditioner load failed")

    monkeypatch.setattr(opt.preconditioner, "load_state_dict", broken)
    with pytest.raises(RuntimeError, match="preconditioner load failed"):
        opt.load_state_dict(other.state_dict())
    after = opt.optimizer.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert after["state"].keys() == before["state"].keys()
    for k, st in before["state"].items():
        for name, value in st.items():
            torch.testing.assert_close(after["state"][k][name], value, rtol=0, atol=0)
    assert opt.param_groups is opt.optimizer.param_groups
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)


def test_preconditioned_adamw_differs_from_adamw(train):
    m1, m2 = _model(), _model()
    a = torch.optim.AdamW(m1.parameters(), lr=1e-2)
    p = make_optimizer("pkfac+adamw", m2, lr=1e-2, loss_kind="cross_entropy")
    train(m1, a, _batches(2))
    train(m2, p, _batches(2))
    assert not torch.allclose(m1[0].weight, m2[0].weight)
