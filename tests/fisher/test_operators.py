import pytest
import torch
from torch import nn

from natgrad.factors import STRATEGIES
from natgrad.fisher import (
    EmpiricalFisher,
    ExactFisher,
    IdentityOperator,
    KFACOperator,
    MCFisher,
)
from natgrad.fisher.dense import dense_ggn, output_jacobian
from natgrad.likelihoods import get_likelihood

RTOL = 1e-6


def close(a, b, rtol=RTOL):
    scale = b.abs().max().clamp_min(1e-12)
    assert float((a - b).abs().max() / scale) < rtol


@pytest.mark.parametrize("name", ["tiny_mlp", "tiny_cnn"])
def test_exact_fisher_matches_dense(name, request):
    model, X, y = request.getfixturevalue(name)
    F = dense_ggn(model, X)
    op = ExactFisher(model, (X, y), chunk_size=3, max_columns=4)
    close(op.to_dense(), F)
    v = torch.randn(op.dim, dtype=torch.float64)
    close(op @ v, F @ v)
    V = torch.randn(op.dim, 5, dtype=torch.float64)
    close(op @ V, F @ V)
    lst = op @ op.unflatten(v)
    close(op.flatten(lst), F @ v)
    close(op.diagonal(), F.diagonal())
    cached = ExactFisher(model, (X, y), chunk_size=3, cache=True)
    close(cached @ V, F @ V)
    close(cached @ V, F @ V)  # second product from the cache


@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_exact_fisher_other_likelihoods(loss, tiny_mlp):
    model, X, _ = tiny_mlp
    F = dense_ggn(model, X, loss)
    op = ExactFisher(model, (X,), loss=loss, chunk_size=4)
    close(op.to_dense(), F)
    close(op.diagonal(), F.diagonal())


def test_algebra_and_scipy(tiny_mlp):
    model, X, y = tiny_mlp
    op = ExactFisher(model, (X, y))
    F = op.to_dense()
    close((2.0 * op + IdentityOperator(op)).to_dense(), 2 * F + torch.eye(op.dim, dtype=F.dtype))
    close((op - op).to_dense() + F, F)
    sp = op.to_scipy()
    v = torch.randn(op.dim, dtype=torch.float64)
    close(torch.from_numpy(sp @ v.numpy()), F @ v)
    assert op.shape == (op.dim, op.dim) and op.dtype == torch.float64


def test_block_restriction(tiny_cnn):
    model, X, y = tiny_cnn
    op = ExactFisher(model, (X, y))
    F = op.to_dense()
    blk = op.block("4")  # the Linear layer
    sl = slice(op.offsets[2], op.offsets[4])
    close(blk.to_dense(), F[sl, sl])
    close(super(ExactFisher, op).block("4").to_dense(), F[sl, sl])  # generic restriction


def _grad_factors(model, X, target, loss):
    out, _ = output_jacobian(model, X)
    o = out.clone().requires_grad_(True)
    (r,) = torch.autograd.grad(get_likelihood(loss).nll(o, target).sum(), o)
    return r


def test_empirical_fisher_matches_dense(tiny_cnn):
    model, X, y = tiny_cnn
    r = _grad_factors(model, X, y, "cross_entropy")
    F = dense_ggn(model, X, factors=r[:, None, :])
    op = EmpiricalFisher(model, (X, y), chunk_size=2)
    close(op.to_dense(), F)
    close(op.diagonal(), F.diagonal())


def test_mc_fisher_matches_dense_and_converges(tiny_mlp):
    model, X, y = tiny_mlp
    op = MCFisher(model, (X, y), mc_samples=3, seed=5, chunk_size=100)
    B = op.output_factor(output_jacobian(model, X)[0], None, 0)
    close(op.to_dense(), dense_ggn(model, X, factors=B))
    exact = dense_ggn(model, X)
    errs = []
    for s in (10, 1000):
        Fm = MCFisher(model, (X, y), mc_samples=s, seed=0, chunk_size=100).to_dense()
        errs.append(float((Fm - exact).norm() / exact.norm()))
    assert errs[1] < errs[0] / 3 and errs[1] < 0.1


def test_refuses_train_mode_dropout(tiny_mlp):
    _, X, y = tiny_mlp
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Linear(5, 3)).double()
    with pytest.raises(ValueError, match="Dropout"):
        ExactFisher(model, (X, y))
    with pytest.raises(ValueError, match="train mode"):
        KFACOperator.from_data(model, (X, y))
    model.eval()
    ExactFisher(model, (X, y))  # explicit eval mode is fine
    assert model.training is False


def test_kfac_exact_for_linear_one_datum():
    """K-FAC (type-2) equals the exact Fisher for a deep linear net and one datum (per block)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).double()
    X = torch.randn(1, 4, dtype=torch.float64)
    F = ExactFisher(model, (X,)).to_dense()
    K = KFACOperator.from_data(model, (X,)).to_dense()
    for a, b in ((0, 15), (15, 23)):
        close(K[a:b, a:b], F[a:b, a:b])
    assert float(K[:15, 15:].abs().max()) == 0.0


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_kfac_operator_equals_dense_kron(strategy, tiny_cnn):
    model, X, y = tiny_cnn
    options = {"rank": 2} if strategy == "projected" else {}
    op = KFACOperator.from_data(model, (X, y), strategy=strategy, factor_options=options)
    K = op.to_dense()
    flat = op.unflatten(torch.arange(op.dim, dtype=torch.float64))
    for name, helper in op.layers.items():
        A, G = op.factors[name]
        block = torch.kron(A.to_dense(), G.to_dense())  # column-stacking vec of (d_G, d_A)
        M = helper.grad_matrix([flat[i] for i in op._index[name]]).long()
        perm = M.T.reshape(-1)  # vec position → flat parameter index
        close(K[perm][:, perm], block)
    close(op.diagonal(), K.diagonal())


def test_kfac_from_optimizer_uses_its_factors(tiny_mlp):
    import natgrad

    model, X, y = tiny_mlp
    opt = natgrad.KFAC(model, lr=0.01, inverse_every=1)
    for _ in range(2):
        loss = nn.functional.cross_entropy(model(X), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    op = KFACOperator.from_optimizer(opt)
    v = torch.randn(op.dim, dtype=torch.float64)
    out = op.unflatten(op @ v)
    parts = op.unflatten(v)
    for name, helper in opt.layers.items():
        A, G = opt.factors[name]
        idx = op._index[name]
        M = helper.grad_matrix([parts[i] for i in idx])
        expect = G.to_dense() @ M @ A.to_dense()
        close(helper.grad_matrix([out[i] for i in idx]), expect, 1e-5)
