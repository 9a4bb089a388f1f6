"""Adam in the Kronecker eigenbasis (natgrad.optim.eigen_adam): checked against a dense float64
reference that rotates ``vec(∇)`` with ``Q_A ⊗ Q_G`` from ``eigh`` of the factors' dense
matrices, keeps Adam's moments there, and rotates back; parameters outside Kronecker blocks are
torch's AdamW."""

from __future__ import annotations

import copy

import pytest
import torch
from _optim_cases import norm_mlp, step_with_grads
from torch import nn

from natgrad import KFAC
from natgrad.fisher.dense import kron_dense, unvec, vec
from natgrad.optim.eigen_adam import EigenAdamOptions

pytestmark = pytest.mark.usefixtures("float64")


def _top_basis(F_dense, r):
    """The top-``r`` eigenvectors of a dense factor (descending), as a ``(d, r)`` matrix."""
    lam, Q = torch.linalg.eigh(F_dense)
    return Q.flip(1)[:, :r]


@pytest.mark.parametrize("factors, factor_options", [
    ("eigh", None), ("projected", {"rank": 2}), ("eigh", {"refresh": "power"})])
def test_step_equals_dense_reference(factors, factor_options):
    """Two steps with the bases refreshed at each; at the second, per Kronecker layer,
    Δ = Q [Qᵀm̂ / (√ŝ + ε)] + (I − P)[(I − P)m̂ / (√t̂ + ε)] with Q the kept columns of
    Q_A ⊗ Q_G (all of them for eigh: P = I), s, t the running means of (Qᵀg)² and ((I − P)g)²,
    and decoupled weight decay. The power refresh (SOAP's) sees the factors of the first step
    again at the second (statistics every 2 steps), where its basis is exact."""
    torch.manual_seed(0)
    model = norm_mlp()
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    lr, wd, (b1, b2), eps = 0.05, 0.1, (0.8, 0.9), 1e-8
    rank = (factor_options or {}).get("rank")
    power = (factor_options or {}).get("refresh") == "power"
    opt = KFAC(model, lr=lr, weight_decay=wd, factors=factors, inverse_every=1,
               curvature_every=2 if power else 1, factor_options=factor_options,
               eigen_adam={"betas": (b1, b2), "eps": eps})
    pnames = {id(p): n for n, p in model.named_parameters()}
    kron = {name: h for name, h in opt.layers.items() if len(opt.factors[name]) == 2}
    assert len(kron) == 2  # both Linear layers

    def bases():
        out = {}
        for name in kron:
            A, G = opt.factors[name]
            rA = A.dim if rank is None else A.eigen()[0].shape[1]
            rG = G.dim if rank is None else G.eigen()[0].shape[1]
            out[name] = kron_dense(_top_basis(A.to_dense(), rA), _top_basis(G.to_dense(), rG))
        return out

    g1 = step_with_grads(model, opt, x, y)
    Q1 = bases()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g2 = step_with_grads(model, opt, x[:8], y[:8])
    Q2 = bases()
    params = dict(model.named_parameters())
    for name, helper in kron.items():
        names = [pnames[id(p)] for p in helper.params]

        def mat(d, names=names, helper=helper):
            return vec(helper.grad_matrix([d[n] for n in names]))

        v1, v2 = mat(g1), mat(g2)
        m_hat = ((1 - b1) * b1 * v1 + (1 - b1) * v2) / (1 - b1**2)
        P1, P2 = Q1[name] @ Q1[name].T, Q2[name] @ Q2[name].T
        eye = torch.eye(len(v1))
        s = ((1 - b2) * b2 * (Q1[name].T @ v1) ** 2 + (1 - b2) * (Q2[name].T @ v2) ** 2)
        t = ((1 - b2) * b2 * ((eye - P1) @ v1) ** 2 + (1 - b2) * ((eye - P2) @ v2) ** 2)
        bc2 = 1 - b2**2
        D = Q2[name] @ ((Q2[name].T @ m_hat) / ((s / bc2).sqrt() + eps))
        if rank is not None:
            D = D + (eye - P2) @ (((eye - P2) @ m_hat) / ((t / bc2).sqrt() + eps))
        rows = helper.grad_matrix([params[n] for n in names]).shape[0]
        expected = (1 - lr * wd) * helper.grad_matrix([before[n] for n in names]) \
            - lr * unvec(D, rows)
        got = helper.grad_matrix([params[n].detach() for n in names])
        torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-10)


def test_parameters_outside_kronecker_blocks_follow_torch_adamw():
    """precondition=False (and the LayerNorm's parameters always) take torch's AdamW step."""
    torch.manual_seed(1)
    model, twin = norm_mlp(), norm_mlp()
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    opt = KFAC(model, lr=0.01, weight_decay=0.1, eigen_adam=True, precondition=False)
    ref = torch.optim.AdamW(twin.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-8,
                            weight_decay=0.1)
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
        opt = KFAC(model, lr=lr, eigen_adam=True)
        for _ in range(3):
            step_with_grads(model, opt, x, y)
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        assert opt.diagnostics()["kl_clip"]["steps"] == 0  # the second moment sets the length
    assert not torch.allclose(finals[0], finals[1])


def test_no_damping_floor_warning_for_a_damping_it_does_not_use():
    """``eigen_adam`` uses the Kronecker factors' eigenbases only: a float32 run at damping 1e-10
    (below the floor K-FAC's solve would raise it to) says nothing about the damping. (A norm
    layer's block bakes λ into its refresh, so with one the warning still comes.)"""
    import warnings

    x, y = torch.randn(12, 5, dtype=torch.float32), torch.randint(0, 3, (12,))
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).float()
    opt = KFAC(model, lr=1e-2, damping=1e-10, eigen_adam=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            step_with_grads(model, opt, x, y)
    assert not [w for w in caught if "damping" in str(w.message)], [str(w.message)
                                                                    for w in caught]


@pytest.mark.parametrize("factors, factor_options", [
    ("projected", {"rank": 2}), ("eigh", {"refresh": "power"})])
def test_checkpoint_resumes_exactly(factors, factor_options):
    torch.manual_seed(3)
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    model = norm_mlp()
    kw = dict(lr=1e-2, eigen_adam=True, factors=factors, factor_options=factor_options,
              inverse_every=1)
    opt = KFAC(model, **kw)
    step_with_grads(model, opt, x, y)
    model2 = norm_mlp()
    model2.load_state_dict(model.state_dict())
    opt2 = KFAC(model2, **kw)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as torch.save / torch.load would
    for _ in range(2):
        step_with_grads(model, opt, x, y)
        step_with_grads(model2, opt2, x, y)
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("kw, match", [
    ({"eigen_adam": "adam"}, "eigen_adam='adam'"),
    ({"eigen_adam": {"beta": 0.9}}, "eigen_adam options"),
    ({"eigen_adam": {"betas": (0.9, 1.0)}}, "betas"),
    ({"eigen_adam": {"eps": 0.0}}, "eps"),
    ({"eigen_adam": True, "kl_clip": 1e-3}, "kl_clip"),
    ({"eigen_adam": True, "momentum": 0.9}, "momentum"),
    ({"eigen_adam": True, "preconditioner": True}, "preconditioner"),
    ({"eigen_adam": True, "graft": "adam"}, "graft"),
    ({"eigen_adam": True, "factors": "cholesky"}, "factors='cholesky'"),
])
def test_bad_options_are_refused_by_name(kw, match):
    with pytest.raises(ValueError, match=match):
        KFAC(norm_mlp(), **kw)


def test_options_coerce():
    assert EigenAdamOptions.coerce(None) is None
    assert EigenAdamOptions.coerce(False) is None
    assert EigenAdamOptions.coerce(True) == EigenAdamOptions()
    assert EigenAdamOptions.coerce({"betas": [0.5, 0.6]}).betas == (0.5, 0.6)
