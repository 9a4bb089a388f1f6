"""KFAC as a torch.optim citizen: SGD equivalence, checkpoints, schedulers, validation, failures."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from natgrad import KFAC


class Scale(nn.Module):
    """A learnable per-feature scale: parameters no layer helper knows (the plain step)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), Scale(8),
                         nn.ReLU(), nn.Linear(8, 3))


def _batches(n: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g))
            for _ in range(n)]


def test_preconditioning_off_equals_sgd_with_groups_and_scheduler(train):
    m1, m2 = _mlp(), _mlp()
    groups = lambda m: [  # noqa: E731
        {"params": list(m[0].parameters()), "lr": 0.05},
        {"params": [p for i, mod in enumerate(m) if i > 0 for p in mod.parameters()]},
    ]
    sgd = torch.optim.SGD(groups(m1), lr=0.1, momentum=0.9, weight_decay=1e-3)
    kfac = KFAC(m2, lr=0.1, params=groups(m2), momentum=0.9, weight_decay=1e-3, precondition=False)
    s1 = torch.optim.lr_scheduler.StepLR(sgd, step_size=4, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(kfac, step_size=4, gamma=0.5)
    batches = _batches()
    train(m1, sgd, batches, s1)
    train(m2, kfac, batches, s2)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=0, atol=0)
    assert kfac.param_groups[1]["lr"] == pytest.approx(0.1 * 0.5**3)


@pytest.mark.parametrize("factors", ["eigh", "cholesky"])
def test_checkpoint_round_trip_continues_identically(factors, tmp_path, train):
    model = _mlp()
    opt = KFAC(model, lr=0.05, factors=factors, inverse_every=3, fisher="mc")
    batches = _batches(10)
    train(model, opt, batches[:5])
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ck.pt")
    train(model, opt, batches[5:])

    model2 = _mlp(seed=99)
    opt2 = KFAC(model2, lr=0.05, factors=factors, inverse_every=3, fisher="mc")
    ck = torch.load(tmp_path / "ck.pt", weights_only=False)
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    train(model2, opt2, batches[5:])
    for p1, p2 in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=0, atol=0)
    assert opt2.steps == opt.steps == 10


def test_load_state_dict_rejects_other_strategy_without_changing_state(train):
    model = _mlp()
    opt = KFAC(model, factors="eigh")
    train(model, opt, _batches(2))
    other = KFAC(_mlp(), factors="cholesky")
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="cholesky"):
        other.load_state_dict(opt.state_dict())
    assert other.steps == before["natgrad"]["steps"]


def test_scheduler_and_callable_hyperparameters(train):
    model = _mlp()
    opt = KFAC(model, lr=0.1, damping=lambda k: 1e-2 if k < 3 else 1e-3,
               inverse_every=lambda k: 1 if k < 3 else 5)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    losses = train(model, opt, _batches(8), sched)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.9**8)


def test_kfac_decreases_the_loss_faster_than_its_own_sgd_twin(train):
    batches = _batches(1, seed=3) * 30
    m1, m2 = _mlp(), _mlp()
    sgd_loss = train(m1, KFAC(m1, lr=0.05, precondition=False), batches)[-1]
    kfac_loss = train(m2, KFAC(m2, lr=0.05), batches)[-1]
    assert kfac_loss < sgd_loss


@pytest.mark.parametrize(
    "kw, name",
    [
        ({"lr": 0.0}, "lr"), ({"lr": float("nan")}, "lr"), ({"momentum": 1.0}, "momentum"),
        ({"weight_decay": -1.0}, "weight_decay"), ({"damping": 0.0}, "damping"),
        ({"factor_decay": 1.0}, "factor_decay"), ({"curvature_every": 0}, "curvature_every"),
        ({"inverse_every": 1.5}, "inverse_every"), ({"kl_clip": -1.0}, "kl_clip"),
        ({"loss": "hinge"}, "loss"), ({"fisher": "true"}, "fisher"),
        ({"factors": "svd"}, "factors"), ({"factor_options": 3}, "factor_options"),
        ({"factor_dtype": "f64"}, "factor_dtype"), ({"factor_dtype": torch.int32}, "factor_dtype"),
        ({"factors": "projected", "factor_options": {"rank": 0}}, "rank"),
        ({"params": [{"params": [], "damping": -1}]}, "damping"),
    ],
)
def test_invalid_hyperparameters_raise_naming_them(kw, name):
    model = _mlp()
    with pytest.raises(ValueError, match=name):
        KFAC(model, **kw)
    # no hooks were left behind on the model
    assert all(not m._forward_hooks for m in model.modules())


def test_model_must_be_a_module():
    with pytest.raises(ValueError, match="model"):
        KFAC([torch.zeros(2, requires_grad=True)])  # type: ignore[arg-type]


def test_callable_returning_invalid_value_raises_before_any_change():
    model = _mlp()
    opt = KFAC(model, damping=lambda k: -1.0)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="damping"):
        opt.step()
    assert opt.steps == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(f.updates == 0 for pair in opt.factors.values() for f in pair)


def test_non_finite_gradient_skips_the_step_and_leaves_factors(train):
    model = _mlp()
    opt = KFAC(model, lr=0.05)
    train(model, opt, _batches(2))
    factors = {n: (A.to_dense().clone(), G.to_dense().clone()) for n, (A, G) in opt.factors.items()}
    params = [p.detach().clone() for p in model.parameters()]
    x, y = _batches(1, seed=5)[0]
    F.cross_entropy(model(x), y).backward()
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        opt.step()
    assert opt.skipped_steps == 1 and opt.steps == 2
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    for n, (A, G) in opt.factors.items():
        assert torch.equal(A.to_dense(), factors[n][0]) and torch.equal(G.to_dense(), factors[n][1])
    # training continues normally afterwards
    train(model, opt, _batches(2, seed=6))
    assert opt.steps == 4


@pytest.mark.parametrize("factors", ["eigh", "projected"])
def test_non_finite_statistics_skip_that_layers_factors_only(factors, train):
    """Finite gradients but non-finite curvature statistics in one layer: that layer's factors
    stay as they were (and are counted), every other layer's are updated, and the step is taken."""
    model = _mlp()
    opt = KFAC(model, lr=0.05, factors=factors, factor_options={"rank": 4} if factors ==
               "projected" else None)
    train(model, opt, _batches(2))
    state = {n: (A.state_dict(), G.state_dict()) for n, (A, G) in opt.factors.items()}
    params = [p.detach().clone() for p in model.parameters()]
    x, y = _batches(1, seed=5)[0]
    F.cross_entropy(model(x), y).backward()
    # layer "2" (the middle Linear): corrupt its captured output-gradient rows
    record = next(r for p in opt._capture._passes for r in p.records if r.name == "2")
    record.g[0][3, 1] = float("inf")
    with pytest.warns(RuntimeWarning, match="non-finite statistics in layer '2'"):
        opt.step()
    assert opt.skipped_curvature_updates == 1 and opt.skipped_steps == 0 and opt.steps == 3
    assert not all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    for name, (A, G) in opt.factors.items():
        for f, before in zip((A, G), state[name]):
            same = f.updates == before["updates"]
            assert same == (name == "2"), name
            if name == "2":
                for key in f.state_keys:
                    value = getattr(f, key)
                    assert (torch.equal(value, before[key]) if isinstance(value, torch.Tensor)
                            else value == before[key])


def test_failed_decomposition_keeps_previous_inverse(monkeypatch, train):
    model = _mlp()
    opt = KFAC(model, lr=0.05, inverse_every=1)
    train(model, opt, _batches(2))
    Q = {n: A.Q.clone() for n, (A, _) in opt.factors.items()}

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("simulated failure")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, opt, _batches(1, seed=7))
    assert opt.failed_refreshes == len(opt.factors)
    assert any("keeping the previous" in str(w.message) for w in caught)
    for n, (A, _) in opt.factors.items():
        assert torch.equal(A.Q, Q[n])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_registration_summary_lists_layers_and_plain_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"),
                          nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4, 2), Scale(2))
    opt = KFAC(model)
    text = opt.registration_summary
    assert "1 [conv2d]" in text and "3 [linear]" in text
    assert "padding_mode='reflect'" in text and "4.weight" in text and "0.weight" in text
    assert set(opt.layers) == {"1", "3"}


def test_registration_summary_reports_ranks_chosen_from_the_energy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 3))
    opt = KFAC(model, factors="projected", factor_options={"energy": 0.5, "max_rank": 8})
    assert "energy=0.5, r<=8)  G:" in opt.registration_summary  # nothing chosen yet
    x, y = torch.randn(16, 30), torch.randint(0, 3, (16,))
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    A, G = opt.factors["0"]
    assert 1 <= A.current_rank <= 8
    assert f"A: projected(d=31, energy=0.5, r<=8) [rank now {A.current_rank}]" in (
        opt.registration_summary)


def test_eval_mode_and_no_grad_forwards_collect_nothing():
    model = _mlp()
    opt = KFAC(model)
    model.eval()
    x, _ = _batches(1)[0]
    model(x)
    model.train()
    with torch.no_grad():
        model(x)
    assert opt._capture.collect() == {}


def test_curvature_every_only_collects_on_curvature_steps(train):
    model = _mlp()
    opt = KFAC(model, curvature_every=3, inverse_every=3)
    train(model, opt, _batches(7))
    assert all(A.updates == 3 for A, _ in opt.factors.values())  # steps 0, 3, 6


def test_hooks_are_attached_only_for_curvature_steps():
    """Between curvature steps the model runs without any natgrad hook."""
    model = _mlp()
    hooked = [m for m in model.modules() if isinstance(m, nn.Linear)] + [model]
    opt = KFAC(model, curvature_every=3, inverse_every=3)
    counts = []
    for x, y in _batches(4):
        counts.append(sum(len(m._forward_hooks) for m in hooked))
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert counts[0] == len(hooked) and counts[1] == counts[2] == 0 and counts[3] == len(hooked)
    opt._capture.remove()
    opt._capture.active = True  # removed for good: nothing is re-attached
    assert sum(len(m._forward_hooks) for m in hooked) == 0


def test_tied_weights_are_preconditioned_once():
    """A parameter shared by two layers belongs to the first layer's Kronecker block only."""
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    model[2].weight = model[0].weight
    opt = KFAC(model, factors="projected", factor_options={"rank": 2})
    assert set(opt.layers) == {"0", "4"}
    assert "shares parameters with layer '0'" in opt.registration_summary
    before = model[0].weight.detach().clone()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(model[0].weight).all() and not torch.equal(model[0].weight, before)
