"""The zoo models train with natgrad.KFAC under every factor strategy, say what they
precondition, and are preconditioned where issue 24 says they must be."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _zoo_cases import Case, batch, build, cases, coverage, logits, named_params

import natgrad
from natgrad.factors import STRATEGIES

STEPS = 3


def loss_of(case: Case, model, x, y) -> torch.Tensor:
    """The user's loss, computed outside the model: cross-entropy on the class logits, or on
    next-token logits (position ``t`` predicts token ``t + 1``)."""
    out = logits(model(x))
    if case.spec.output == "sequence":
        return F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), y[:, 1:].reshape(-1))
    return F.cross_entropy(out, y)


def test_every_strategy_is_tested():
    assert {"eigh", "cholesky", "projected", "recursive"} <= set(STRATEGIES)


@pytest.mark.parametrize("strategy", ["eigh", "cholesky", "projected", "recursive"])
@pytest.mark.parametrize("case", cases("train"))
def test_trains_with_every_strategy(case: Case, strategy: str):
    model = build(case)
    x, y = batch(case, 8)
    opt = natgrad.KFAC(model, lr=0.05, factors=strategy, inverse_every=1,
                       factor_options={"rank": 4} if strategy == "projected" else None)
    before = {n: p.detach().clone() for n, p in named_params(model)}
    moved: set[str] = set()
    for step in range(STEPS):
        loss = loss_of(case, model, x, y)
        assert math.isfinite(loss.item()), (step, loss.item())
        opt.zero_grad()
        loss.backward()
        if step == 0:
            # (a key bias has a zero gradient up to rounding: attention is shift-invariant)
            moved = {n for n, p in named_params(model)
                     if p.grad is not None and p.grad.abs().max() > 1e-8}
        opt.step()
    assert math.isfinite(loss_of(case, model, x, y).item())
    after = dict(named_params(model))
    assert moved and all(not torch.equal(before[n], after[n]) for n in moved)
    # curvature collected at every step for every preconditioned layer
    assert opt.layers and all(v == STEPS for v in opt.curvature.updates.values())
    # the summary names every preconditioned layer and every other parameter, with a reason
    summary = opt.registration_summary
    assert summary.startswith(f"K-FAC ({strategy} factors")
    for name in opt.layers:
        assert f"preconditioned  {name} [" in summary
    covered = {id(p) for h in opt.layers.values() for p in h.params}
    for name, p in named_params(model):
        if id(p) not in covered:
            assert name in opt.curvature.registration.plain, name
            assert f"    {name}: " in summary, name


@pytest.mark.parametrize("case", cases("coverage"))
def test_coverage(case: Case):
    """Preconditioned fraction by parameter count; only bare parameters outside any layer
    (class token, position embedding, layer scale) may take the plain step."""
    model = build(case)
    opt = natgrad.KFAC(model)
    plain = set(opt.curvature.registration.plain)
    assert all(n.endswith(case.plain) for n in plain) if case.plain else not plain, \
        opt.registration_summary
    assert coverage(model, opt.layers) >= case.min_coverage, opt.registration_summary


@pytest.mark.parametrize("case", cases("loss_inside", output="sequence"))
def test_loss_inside_the_model(case: Case):
    """The transformers pattern ``model(ids, labels=ids).loss`` collects curvature silently."""
    import warnings

    model = build(case)
    x, _ = batch(case, 8)
    opt = natgrad.KFAC(model, lr=0.05)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", module="natgrad")
        for _ in range(2):
            loss = model(x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert opt.layers and all(v == 2 for v in opt.curvature.updates.values())
