"""Damped inverses (K-FAC closed forms, EK-FAC, CG) against dense float64 solves."""

import warnings

import pytest
import torch
from torch import nn

from natgrad.factors import EighFactor, split_damping
from natgrad.fisher import (
    CGInverse,
    EKFACOperator,
    EmpiricalFisher,
    ExactFisher,
    IdentityOperator,
    KFACInverse,
    KFACOperator,
    MCFisher,
    damped_inverse,
)
from natgrad.fisher.dense import dense_ggn, unvec

TOL = 1e-8
LAM = 0.1
STRATEGIES = [("eigh", None), ("projected", {"rank": 2}), ("cholesky", None),
              ("recursive", None)]


def close(a, b, tol=TOL):
    scale = b.abs().max().clamp_min(1e-12)
    assert float((a - b).abs().max() / scale) < tol


def dense_inverse(M, lam=LAM):
    return torch.linalg.inv(M + lam * torch.eye(M.shape[0], dtype=M.dtype))


def embedding(op, name):
    """``(P, d_G d_A)``: column ``k`` is the flat vector of the layer matrix ``unvec(e_k)``."""
    helper, block = op.layers[name], op.blocks[name]
    dg, da = block.G.dim, block.A.dim
    E = torch.zeros(op.dim, dg * da, dtype=torch.float64)
    for k in range(dg * da):
        e = torch.zeros(dg * da, dtype=torch.float64)
        e[k] = 1.0
        for i, t in zip(op._index[name], helper.split_matrix(unvec(e, dg))):
            E[op.offsets[i]:op.offsets[i + 1], k] = t.reshape(-1)
    return E


@pytest.mark.parametrize("name", ["tiny_mlp", "tiny_cnn"])
@pytest.mark.parametrize("strategy,options", STRATEGIES)
def test_kfac_exact_damped_inverse(name, strategy, options, request):
    model, X, y = request.getfixturevalue(name)
    op = KFACOperator.from_data(model, (X, y), strategy=strategy, factor_options=options)
    if strategy == "projected" and name == "tiny_mlp":  # the rank really truncates
        assert op.blocks["0"].A.eigen()[0].shape[1] < op.blocks["0"].A.dim
    inv = KFACInverse(op, LAM)
    close(inv.to_dense(), dense_inverse(op.to_dense()))
    v = torch.randn(op.dim, dtype=torch.float64)
    close((op + LAM * IdentityOperator(op)) @ (inv @ v), v)  # composes
    close(torch.from_numpy(inv.to_scipy() @ v.numpy()), inv @ v)


@pytest.mark.parametrize("name", ["tiny_mlp", "tiny_cnn"])
@pytest.mark.parametrize("strategy,options", STRATEGIES[:2])
def test_kfac_factored_damping_is_the_optimizers(name, strategy, options, request):
    """``(A + π√λ I)⁻¹ ⊗ (G + √λ/π I)⁻¹`` per block, which is not ``(A ⊗ G + λ I)⁻¹``."""
    model, X, y = request.getfixturevalue(name)
    op = KFACOperator.from_data(model, (X, y), strategy=strategy, factor_options=options)
    K = torch.zeros(op.dim, op.dim, dtype=torch.float64)
    for layer, block in op.blocks.items():
        da, dg = split_damping(block.A, block.G, LAM)
        A = block.A.to_dense().double() + da * torch.eye(block.A.dim, dtype=torch.float64)
        G = block.G.to_dense().double() + dg * torch.eye(block.G.dim, dtype=torch.float64)
        E = embedding(op, layer)
        K += E @ torch.kron(A, G) @ E.T
    factored = KFACInverse(op, LAM, damping_mode="factored").to_dense()
    close(factored, torch.linalg.inv(K))
    assert float((factored - KFACInverse(op, LAM).to_dense()).abs().max()) > 1e-3


def test_uncovered_parameters_get_one_over_damping():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    X, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    op = KFACOperator.from_data(model, (X, y))
    close(KFACInverse(op, LAM).to_dense(), dense_inverse(op.to_dense()))


@pytest.mark.parametrize("name", ["tiny_mlp", "tiny_cnn"])
@pytest.mark.parametrize("kind", ["exact", "mc", "empirical"])
def test_cg_inverse_matches_dense_solve(name, kind, request):
    model, X, y = request.getfixturevalue(name)
    F = {"exact": ExactFisher, "mc": MCFisher, "empirical": EmpiricalFisher}[kind](
        model, (X, y), cache=True, max_columns=8)
    ref = dense_inverse(dense_ggn(model, X) if kind == "exact" else F.to_dense())
    cg = CGInverse(F, LAM, tol=1e-12)
    V = torch.randn(F.dim, 3, dtype=torch.float64)
    close(cg @ V, ref @ V)
    assert cg.info.converged and len(cg.info.residuals) == 3
    assert max(cg.info.residuals) <= 1e-12
    pre = CGInverse(F, LAM, tol=1e-12, preconditioner=KFACInverse(
        KFACOperator.from_data(model, (X, y), fisher=kind), LAM))
    close(pre @ V, ref @ V)
    assert pre.info.converged


def test_cg_reports_non_convergence(tiny_mlp):
    model, X, y = tiny_mlp
    cg = CGInverse(ExactFisher(model, (X, y), cache=True), 1e-3, tol=1e-12, max_iter=2)
    with pytest.warns(RuntimeWarning, match="did not reach tol"):
        cg @ torch.randn(cg.dim, dtype=torch.float64)
    assert not cg.info.converged and cg.info.iterations == 2
    quiet = CGInverse(cg.op, 1e-3, max_iter=2, warn=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet @ torch.randn(cg.dim, dtype=torch.float64)


def eigenbasis(op, layer, QA, QG):
    return embedding(op, layer) @ torch.kron(QA, QG)


@pytest.mark.parametrize("name", ["tiny_mlp", "tiny_cnn"])
@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_ekfac_scalings_are_the_fisher_in_the_kronecker_eigenbasis(name, kind, request):
    model, X, y = request.getfixturevalue(name)
    F = (ExactFisher if kind == "exact" else EmpiricalFisher)(model, (X, y), chunk_size=2,
                                                              cache=True, max_columns=8)
    E = EKFACOperator.from_fisher(F)
    Fd = F.to_dense() if kind == "empirical" else dense_ggn(model, X)
    assert set(E.scalings) == set(E.kfac.layers) and not E.kfac_layers
    for layer, S in E.scalings.items():
        block = E.kfac.blocks[layer]
        QA, QG = E.bases[layer]
        # the bases are the K-FAC factors' eigenvectors
        close(QA.T @ block.A.to_dense().double() @ QA,
              torch.diag(torch.diagonal(QA.T @ block.A.to_dense().double() @ QA)))
        Q = eigenbasis(E.kfac, layer, QA, QG)
        close(S.T.reshape(-1), torch.diagonal(Q.T @ Fd @ Q), 1e-10)
    Ed = E.to_dense()
    close(E.diagonal(), Ed.diagonal())
    close(E.inverse(LAM).to_dense(), dense_inverse(Ed))
    close(damped_inverse(E, LAM).to_dense(), dense_inverse(Ed))


def test_ekfac_is_exact_where_kfac_is(tiny_mlp):
    """One sample through a linear model: K-FAC is exact, so is EK-FAC (same basis, same
    eigenvalues)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 2)).double()
    X, y = torch.randn(1, 3, dtype=torch.float64), torch.tensor([1])
    F = ExactFisher(model, (X, y))
    E = EKFACOperator.from_fisher(F)
    close(E.to_dense(), F.to_dense())
    close(E.to_dense(), E.kfac.to_dense())


def test_damped_inverse_dispatch_and_bad_input(tiny_mlp):
    model, X, y = tiny_mlp
    K = KFACOperator.from_data(model, (X, y))
    F = ExactFisher(model, (X, y))
    assert isinstance(damped_inverse(K, LAM), KFACInverse)
    assert isinstance(damped_inverse(F, LAM, tol=1e-6), CGInverse)
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="damping"):
            KFACInverse(K, bad)
        with pytest.raises(ValueError, match="damping"):
            CGInverse(F, bad)
    with pytest.raises(ValueError, match="damping_mode"):
        KFACInverse(K, LAM, damping_mode="pi")
    with pytest.raises(ValueError, match="tol"):
        CGInverse(F, LAM, tol=2.0)
    with pytest.raises(ValueError, match="max_iter"):
        CGInverse(F, LAM, max_iter=0)
    with pytest.raises(TypeError, match="KFACOperator"):
        KFACInverse(F, LAM)


def test_float32_optimizer_factors():
    """Factors kept in float32 (the optimizer's precision) give the float32 inverse."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    X, y = torch.randn(9, 4), torch.randint(0, 3, (9,))
    op = KFACOperator.from_data(model, (X, y), strategy="projected", factor_options={"rank": 2})
    A = op.blocks["0"].A
    assert A.dtype == torch.float32 and not isinstance(A, EighFactor)
    ref = dense_inverse(op.to_dense().double())
    close(KFACInverse(op, LAM).to_dense().double(), ref, 1e-5)
