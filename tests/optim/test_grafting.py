"""Adam grafting (natgrad.optim.grafting): the direction is the damped natural gradient of Adam's
first moment, its per-layer length is Adam's step's, and everything else is Adam."""

from __future__ import annotations

import copy

import pytest
import torch
from _optim_cases import norm_mlp, step_with_grads

from natgrad import KFAC
from natgrad.fisher.dense import kron_dense, unvec, vec
from natgrad.optim.grafting import GraftOptions

pytestmark = pytest.mark.usefixtures("float64")


@pytest.mark.parametrize("factors", ["eigh", "projected"])
def test_grafted_step_equals_dense_reference(factors):
    """Two steps; at the second, per preconditioned layer, Δ = −η (‖a‖/‖D‖) D with
    D = (A ⊗ G + λI)⁻¹ vec(m̂) (dense float64, exact damping), a = m̂ / (√v̂ + ε)."""
    torch.manual_seed(0)
    model = norm_mlp()
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    lr, damping, (b1, b2), eps = 0.05, 0.1, (0.8, 0.9), 1e-8
    opt = KFAC(model, lr=lr, damping=damping, factors=factors, inverse_every=1,
               factor_options={"rank": 2} if factors == "projected" else None,
               graft={"betas": (b1, b2), "eps": eps})
    g1 = step_with_grads(model, opt, x, y)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g2 = step_with_grads(model, opt, x[:8], y[:8])
    pnames = {id(p): n for n, p in model.named_parameters()}
    m_hat = {n: ((1 - b1) * b1 * g1[n] + (1 - b1) * g2[n]) / (1 - b1**2) for n in g1}
    v_hat = {n: ((1 - b2) * b2 * g1[n] ** 2 + (1 - b2) * g2[n] ** 2) / (1 - b2**2) for n in g1}
    adam = {n: m_hat[n] / (v_hat[n].sqrt() + eps) for n in g1}
    params = dict(model.named_parameters())
    checked = 0
    for name, helper in opt.layers.items():
        names = [pnames[id(p)] for p in helper.params]
        a_norm = torch.cat([adam[n].flatten() for n in names]).norm()
        step = torch.cat([(before[n] - params[n].detach()).flatten() for n in names])
        torch.testing.assert_close(step.norm(), lr * a_norm)  # Adam's length, every layer
        if len(opt.factors[name]) != 2:
            continue  # the LayerNorm's block: its length is checked above
        A, G = opt.factors[name]
        V = helper.grad_matrix([m_hat[n] for n in names])
        K = kron_dense(A.to_dense(), G.to_dense()) + damping * torch.eye(A.dim * G.dim)
        D = unvec(torch.linalg.solve(K, vec(V)), V.shape[0])
        delta = helper.grad_matrix([before[n] - params[n].detach() for n in names])
        torch.testing.assert_close(delta, lr * a_norm / D.norm() * D, rtol=1e-7, atol=1e-12)
        checked += 1
    assert checked == 2  # both Linear layers


def test_not_preconditioned_parameters_follow_torch_adam():
    torch.manual_seed(1)
    model, twin = norm_mlp(), norm_mlp()
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    opt = KFAC(model, lr=0.01, graft="adam", precondition=False)
    ref = torch.optim.Adam(twin.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-8)
    for _ in range(4):
        step_with_grads(model, opt, x, y)
        step_with_grads(twin, ref, x, y)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


def test_lr_changes_the_trajectory_and_no_clip_is_recorded():
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    finals = []
    for lr in (1e-3, 1e-2):
        torch.manual_seed(2)
        model = norm_mlp()
        opt = KFAC(model, lr=lr, graft="adam")
        for _ in range(3):
            step_with_grads(model, opt, x, y)
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        assert opt.diagnostics()["kl_clip"]["steps"] == 0  # the graft decides the length
    assert not torch.allclose(finals[0], finals[1])


def test_checkpoint_resumes_exactly():
    torch.manual_seed(3)
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    model = norm_mlp()
    opt = KFAC(model, lr=1e-2, graft="adam", factors="projected")
    step_with_grads(model, opt, x, y)
    model2 = norm_mlp()
    model2.load_state_dict(model.state_dict())
    opt2 = KFAC(model2, lr=1e-2, graft="adam", factors="projected")
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as torch.save / torch.load would
    for _ in range(2):
        step_with_grads(model, opt, x, y)
        step_with_grads(model2, opt2, x, y)
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("kw, match", [
    ({"graft": "sgd"}, "graft='sgd'"),
    ({"graft": {"beta": 0.9}}, "graft options"),
    ({"graft": {"betas": (0.9, 1.0)}}, "betas"),
    ({"graft": {"eps": 0.0}}, "eps"),
    ({"graft": "adam", "kl_clip": 1e-3}, "kl_clip"),
    ({"graft": "adam", "momentum": 0.9}, "momentum"),
    ({"graft": "adam", "preconditioner": True}, "preconditioner"),
])
def test_bad_graft_options_are_refused_by_name(kw, match):
    with pytest.raises(ValueError, match=match):
        KFAC(norm_mlp(), **kw)


def test_options_coerce():
    assert GraftOptions.coerce(None) is None
    assert GraftOptions.coerce("adam") == GraftOptions()
    assert GraftOptions.coerce({"betas": [0.5, 0.6]}).betas == (0.5, 0.6)
