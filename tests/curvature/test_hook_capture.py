"""The optimizer's capture commits statistics only for backpropagated forwards, and leaves
``torch.func`` transforms of the model alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap

import natgrad
from natgrad.curvature import FISHER_TYPES


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).double()


def _batches(n: int = 3):
    g = torch.Generator().manual_seed(4)
    return [(torch.randn(8, 5, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def _run(fisher: str, extra_forwards: bool) -> natgrad.KFAC:
    model = _model()
    opt = natgrad.KFAC(model, lr=0.1, fisher=fisher)
    probe = torch.randn(32, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    for x, y in _batches():
        if extra_forwards:  # a train-mode forward with gradients that is never backpropagated
            model(probe).sum()
        loss = F.cross_entropy(model(x), y)
        if extra_forwards:
            model(probe)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


@pytest.mark.parametrize("fisher", FISHER_TYPES)
def test_extra_forwards_leave_the_factors_unchanged(fisher):
    plain, extra = _run(fisher, False), _run(fisher, True)
    for name, (A, G) in plain.factors.items():
        A2, G2 = extra.factors[name]
        assert A.updates == A2.updates == 3
        assert torch.equal(A.to_dense(), A2.to_dense()), name
        assert torch.equal(G.to_dense(), G2.to_dense()), name  # and no Monte-Carlo label drawn


def test_vmap_jacrev_over_the_model_works_while_a_kfac_exists():
    model = _model()
    opt = natgrad.KFAC(model, lr=0.1)  # armed: the next forward is a curvature step
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(4, 5, dtype=torch.float64)

    def f(p, xi):
        return functional_call(model, p, (xi[None],))[0]

    jac = vmap(jacrev(f), in_dims=(None, 0))(params, x)
    assert jac["0.weight"].shape == (4, 3, 6, 5)
    # the transforms left nothing behind: the next ordinary step collects this batch only
    (xb, yb), = _batches(1)
    F.cross_entropy(model(xb), yb).backward()
    opt.step()
    assert all(f.updates == 1 for pair in opt.factors.values() for f in pair)
    assert opt.curvature.updates == {"0": 1, "2": 1}


def test_statistics_need_the_backward_through_the_model_output():
    """A loss on a tensor the capture never saw (the forward bypasses the model given to KFAC)
    reaches the layers but not the logits: reported, not silently ignored."""
    model = _model()
    outer = nn.Sequential(model)  # KFAC is given the wrapper, the loop calls the inner model
    opt = natgrad.KFAC(outer, lr=0.1)
    (x, y), = _batches(1)
    F.cross_entropy(model(x), y).backward()
    stats = opt._capture.collect()
    assert stats == {}
    assert opt._capture.report.without_output == {"0.0", "0.2"}
