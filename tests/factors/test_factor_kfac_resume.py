"""KFAC with the projected and recursive strategies: it trains; checkpoints resume identically."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from natgrad import KFAC
from natgrad.factors import EighFactor, ProjectedFactor, RecursiveFactor


def _data(steps: int):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 12, generator=gen), torch.randint(0, 4, (16,), generator=gen))
            for _ in range(steps)]


@pytest.mark.parametrize("factors", ["projected", "recursive"])
def test_checkpoint_resume_continues_identically(factors, train):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 4))
    options = {"rank": 6} if factors == "projected" else {}
    kwargs = dict(lr=0.1, factors=factors, factor_options=options, inverse_every=3,
                  damping=1e-2)
    opt = KFAC(model, **kwargs)
    kinds = [type(f) for pair in opt.factors.values() for f in pair]
    if factors == "projected":  # A of layer 0 (13) and both of layer 1 (21, 4) vs G of layer 0 (20)
        assert kinds == [ProjectedFactor, ProjectedFactor, ProjectedFactor, EighFactor]
        assert "projected(d=13, r=6)" in opt.registration_summary
    else:
        assert set(kinds) == {RecursiveFactor}
    batches = _data(14)
    first = train(model, opt, batches[:7])
    assert all(torch.isfinite(torch.tensor(first)))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())

    rest = train(model, opt, batches[7:])
    torch.manual_seed(123)  # a different global RNG state must not matter
    clone = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 4))
    clone.load_state_dict(saved_model)
    opt2 = KFAC(clone, **kwargs)
    opt2.load_state_dict(saved_opt)
    rest2 = train(clone, opt2, batches[7:])
    assert rest == rest2
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)
    assert rest[-1] < first[0]
