"""K-FAC against dense float64 references: factors, provably exact cases, the damped solve."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from natgrad import KFAC
from natgrad.fisher.dense import kron_dense, layer_fisher_block, unvec, vec

pytestmark = pytest.mark.usefixtures("float64")


def _one_step(model, x, y, **kw):
    """One KFAC step; returns the optimizer (factors filled, inverses refreshed)."""
    opt = KFAC(model, lr=1.0, momentum=0.0, kl_clip=None, **kw)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return opt


def _per_sample_factors(model, layer, x, y):
    """Brute force: A = (1/m) Σ ā ā^T and empirical G = (1/m) Σ g g^T, g = ∂ℓ_n/∂s_n."""
    A = 0
    G = 0
    m = x.shape[0]
    for n in range(m):
        store: dict = {}
        h = layer.register_forward_hook(lambda mod, i, o, store=store: store.update(a=i[0], s=o))
        out = model(x[n : n + 1])
        h.remove()
        g = torch.autograd.grad(F.cross_entropy(out, y[n : n + 1]), store["s"])[0][0]
        a = torch.cat([store["a"][0], torch.ones(1)])
        A = A + torch.outer(a, a) / m
        G = G + torch.outer(g, g) / m
    return A, G


def test_factors_equal_per_sample_brute_force():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(7, 5), torch.randint(0, 3, (7,))
    # capture the factors before the step changes the weights
    snapshot = [p.detach().clone() for p in model.parameters()]
    opt = _one_step(model, x, y, fisher="empirical")
    with torch.no_grad():
        for p, s in zip(model.parameters(), snapshot):
            p.copy_(s)
    for name, layer in (("0", model[0]), ("2", model[2])):
        A_ref, G_ref = _per_sample_factors(model, layer, x, y)
        A, G = opt.factors[name]
        torch.testing.assert_close(A.to_dense(), A_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(G.to_dense(), G_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_single_linear_layer_one_datum_is_exact(bias):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 3, bias=bias))
    x, y = torch.randn(1, 4), torch.tensor([2])
    F_ref = layer_fisher_block(model, model[0], x)
    opt = _one_step(model, x, y, fisher="exact")
    # weights changed after the step; the factors were taken before it: rebuild reference there
    A, G = opt.factors["0"]
    torch.testing.assert_close(kron_dense(A.to_dense(), G.to_dense()), F_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_deep_linear_network_one_datum_blocks_are_exact(loss):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(3, 3))
    x = torch.randn(1, 4)
    y = torch.tensor([1]) if loss == "cross_entropy" else torch.randn(1, 3)
    refs = {name: layer_fisher_block(model, model[int(name)], x, loss) for name in ("0", "1", "2")}
    opt = KFAC(model, lr=1.0, momentum=0.0, kl_clip=None, fisher="exact", loss=loss)
    out = model(x)
    nll = F.cross_entropy(out, y) if loss == "cross_entropy" else 0.5 * (out - y).pow(2).sum()
    nll.backward()
    opt.step()
    for name, F_ref in refs.items():
        A, G = opt.factors[name]
        K = kron_dense(A.to_dense(), G.to_dense())
        torch.testing.assert_close(K, F_ref, rtol=1e-9, atol=1e-12)


def test_conv_with_one_location_one_datum_is_exact():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3, 4))
    x, y = torch.randn(1, 2, 3, 3), torch.tensor([0])
    F_ref = layer_fisher_block(model, model[0], x)
    opt = _one_step(model, x, y, fisher="exact")
    A, G = opt.factors["0"]
    torch.testing.assert_close(kron_dense(A.to_dense(), G.to_dense()), F_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "model_fn, x_shape",
    [
        (lambda: nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)), (9, 6)),
        (
            lambda: nn.Sequential(
                nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=1), nn.ReLU(inplace=True),
                nn.Conv2d(3, 2, 2, padding=1, bias=False, dilation=2), nn.Flatten(),
                nn.LazyLinear(4),
            ),
            (5, 2, 6, 6),
        ),
        # three equal-shaped full-rank blocks: one batched solve (factors.solve_many)
        (lambda: nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(),
                               nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(),
                               nn.Linear(5, 4)), (9, 6)),
    ],
)
@pytest.mark.parametrize("fisher", ["mc", "empirical", "exact"])
def test_update_equals_dense_damped_solve(model_fn, x_shape, fisher):
    torch.manual_seed(4)
    model = model_fn()
    x = torch.randn(*x_shape)
    model(x)  # materialise lazy layers
    y = torch.randint(0, 4, (x_shape[0],))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    damping = 0.3
    opt = _one_step(model, x, y, fisher=fisher, damping=damping)
    assert len(opt.layers) >= 2
    for name, helper in opt.layers.items():
        A, G = opt.factors[name]
        grads = [p.grad for p in helper.params]
        V = helper.grad_matrix(grads)
        K = kron_dense(A.to_dense(), G.to_dense())
        K = K + damping * torch.eye(K.shape[0])
        expected = unvec(torch.linalg.solve(K, vec(V)), V.shape[0])
        params = dict(model.named_parameters())
        pnames = {id(p): n for n, p in params.items()}
        delta = helper.grad_matrix([before[pnames[id(p)]] - p.detach() for p in helper.params])
        torch.testing.assert_close(delta, expected, rtol=1e-8, atol=1e-10)


def test_cholesky_strategy_applies_pi_split_damping():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    before = [p.detach().clone() for p in model.parameters()]
    damping = 0.1
    opt = _one_step(model, x, y, fisher="exact", factors="cholesky", damping=damping)
    helper = opt.layers["2"]
    A, G = (f.to_dense() for f in opt.factors["2"])
    pi = ((A.trace() / A.shape[0]) / (G.trace() / G.shape[0])).sqrt()
    Ad = A + pi * damping**0.5 * torch.eye(A.shape[0])
    Gd = G + damping**0.5 / pi * torch.eye(G.shape[0])
    V = helper.grad_matrix()
    expected = torch.linalg.solve(Gd, V) @ torch.linalg.inv(Ad)
    delta = helper.grad_matrix([b - p.detach() for b, p in zip(before[2:], model[2].parameters())])
    torch.testing.assert_close(delta, expected, rtol=1e-8, atol=1e-10)


def test_gradient_accumulation_equals_full_batch_statistics():
    torch.manual_seed(6)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    models = [nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [KFAC(m, lr=0.1, fisher="exact") for m in models]
    loss = F.cross_entropy(models[0](x), y)
    loss.backward()
    opts[0].step()
    for chunk in (slice(0, 4), slice(4, 8)):
        (F.cross_entropy(models[1](x[chunk]), y[chunk]) / 2).backward()
    opts[1].step()
    for name in opts[0].factors:
        for f0, f1 in zip(opts[0].factors[name], opts[1].factors[name]):
            torch.testing.assert_close(f0.to_dense(), f1.to_dense(), rtol=1e-10, atol=1e-12)
    for p0, p1 in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p0, p1, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize(
    "model_fn, x_shape, batched",
    [
        (lambda: nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 5)), (9, 12), 0),
        (lambda: nn.Sequential(nn.Conv2d(2, 6, 3, padding=1, bias=False), nn.Flatten(),
                               nn.Linear(6 * 4 * 4, 5)), (4, 2, 4, 4), 0),
        # two equal-shaped hidden layers: solved together
        (lambda: nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(),
                               nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 5)), (9, 12), 1),
    ],
)
def test_factored_low_rank_update_equals_dense_solve_with_kl_clip(model_fn, x_shape, batched,
                                                                  weight_decay, monkeypatch):
    """Projected factors of rank < d on both sides take the factored path (the direction is added
    to the weight and bias in place); the parameter change must still be ``η ν (A ⊗ G + λ I)⁻¹
    vec(∇ + wd·W)`` with the KL-clip factor ``ν`` of the dense direction."""
    torch.manual_seed(6)
    model = model_fn()
    x, y = torch.randn(*x_shape), torch.randint(0, 5, (x_shape[0],))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr, damping, kappa = 0.7, 0.2, 1e-3
    opt = KFAC(model, lr=lr, damping=damping, kl_clip=kappa, weight_decay=weight_decay,
               factors="projected", factor_options={"rank": 3})
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    import natgrad.factors.kronecker as kron

    calls = []
    solve_batch = kron._batched_solve
    monkeypatch.setattr(kron, "_batched_solve",
                        lambda reqs, full: calls.append(len(reqs)) or solve_batch(reqs, full))
    opt.step()
    assert len(calls) == batched
    pnames = {id(p): n for n, p in model.named_parameters()}
    directions, vg = {}, 0.0
    for name, helper in opt.layers.items():
        A, G = opt.factors[name]
        assert A.current_rank == G.current_rank == 3 < min(A.dim, G.dim)  # both low rank
        names = [pnames[id(p)] for p in helper.params]
        V = helper.grad_matrix([grads[n] + weight_decay * before[n] for n in names])
        K = kron_dense(A.to_dense(), G.to_dense()) + damping * torch.eye(A.dim * G.dim)
        D = unvec(torch.linalg.solve(K, vec(V)), V.shape[0])
        directions[name] = (names, D)
        vg += lr**2 * float((V * D).sum())
    nu = min(1.0, (kappa / vg) ** 0.5)
    assert nu < 1.0  # the clip is active, so the scale is tested too
    params = dict(model.named_parameters())
    for name, (names, D) in directions.items():
        helper = opt.layers[name]
        delta = helper.grad_matrix([before[n] - params[n].detach() for n in names])
        torch.testing.assert_close(delta, lr * nu * D, rtol=1e-8, atol=1e-11)
