"""KroneckerLaplace (natgrad.fisher.posterior) against dense float64 references on a tiny MLP:
the applied covariance root equals the dense ``(N·K + δI)^{-1/2}`` (full-rank factors) and the
dense low-rank-plus-identity form (rank-r projected factors); the closed-form log determinant,
the evidence's grid choice, the samples' covariance and the sampled predictive."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from natgrad.fisher import KFACOperator
from natgrad.fisher.posterior import KroneckerLaplace, kron_function, spectrum

N = 40


def _model_data(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(),
                          nn.Linear(4, 3)).double().eval()
    X = torch.randn(N, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (N,))
    return model, (X, y)


def _dense_power(M: torch.Tensor, power: float) -> torch.Tensor:
    lam, Q = torch.linalg.eigh(M)
    return (Q * lam.pow(power)) @ Q.T


CASES = [("eigh", None), ("projected", {"rank": 8}), ("projected", {"rank": 2}),
         ("projected", {"rank": 3})]


@pytest.mark.parametrize("strategy,options", CASES)
@pytest.mark.parametrize("delta", [0.3, 5.0])
def test_root_is_dense_inverse_square_root(strategy, options, delta):
    model, data = _model_data()
    la = KroneckerLaplace.fit(model, data, strategy=strategy, factor_options=options,
                              prior_precision=delta, chunk_size=16)
    K = la.op.to_dense()  # the factors as represented: dense, or rank r plus σ I
    S = _dense_power(N * K + delta * torch.eye(K.shape[0], dtype=K.dtype), -0.5)
    R = la.root().to_dense()
    assert (R - S).abs().max() <= 1e-10 * S.abs().max()
    sign, logdet = torch.linalg.slogdet(N * K + delta * torch.eye(K.shape[0], dtype=K.dtype))
    assert sign > 0 and la.log_det_precision() == pytest.approx(float(logdet), rel=1e-10)


def test_projected_full_rank_is_the_dense_kfac():
    """Rank at least the widths: the projected posterior is the eigh one."""
    model, data = _model_data(1)
    a = KroneckerLaplace.fit(model, data, strategy="eigh", prior_precision=1.0)
    b = KroneckerLaplace.fit(model, data, strategy="projected", factor_options={"rank": 8},
                             prior_precision=1.0)
    ref = KFACOperator.from_data(model, data, strategy="eigh").to_dense()
    assert (a.op.to_dense() - ref).abs().max() <= 1e-12 * ref.abs().max()
    Ra, Rb = a.root().to_dense(), b.root().to_dense()
    assert (Ra - Rb).abs().max() <= 1e-9 * Ra.abs().max()


def test_low_rank_factor_form():
    """kron_function on one rank-r pair against the dense U diag(μ) Uᵀ + σ (I − U Uᵀ) form."""
    g = torch.Generator().manual_seed(3)
    specs = []
    for d, r in ((7, 2), (5, 5)):
        U = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0][:, :r]
        specs.append((U, torch.rand(r, generator=g, dtype=torch.float64) + 1, 0.4 if r < d
                      else 0.0))

    def dense(s):
        U, mu, sig = s
        return U @ torch.diag(mu) @ U.T + sig * (torch.eye(U.shape[0], dtype=U.dtype) - U @ U.T)

    for A, G in (specs, specs[::-1]):
        K = torch.kron(dense(G), dense(A))  # row-major vec of the (d_G, d_A) matrix
        ref = _dense_power(K + 0.7 * torch.eye(K.shape[0], dtype=K.dtype), -0.5)
        V = torch.randn(G[0].shape[0], A[0].shape[0], generator=g, dtype=torch.float64)
        out = kron_function(V, A, G, lambda lam: (lam + 0.7).rsqrt())
        assert torch.allclose(out.reshape(-1), ref @ V.reshape(-1), atol=1e-12)


def test_spectrum_of_dense_factor_strategy():
    model, data = _model_data()
    op = KFACOperator.from_data(model, data, strategy="cholesky")
    A = op.blocks["0"].A
    U, mu, sig = spectrum(A)
    assert sig == 0.0 and torch.allclose((U * mu) @ U.T, A.to_dense().double(), atol=1e-12)


def test_prior_precision_by_evidence():
    model, data = _model_data()
    la = KroneckerLaplace.fit(model, data, strategy="projected", factor_options={"rank": 2})
    ll = la.log_likelihood(data)
    with torch.no_grad():
        ref_ll = -float(nn.functional.cross_entropy(model(data[0]), data[1], reduction="sum"))
    assert ll == pytest.approx(ref_ll, rel=1e-12)
    K = la.op.to_dense()
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    grid = [0.01, 0.1, 1.0, 10.0, 100.0]

    def dense_evidence(d):
        P = K.shape[0]
        logdet = torch.linalg.slogdet(N * K + d * torch.eye(P, dtype=K.dtype))[1]
        return ref_ll - 0.5 * (d * float(theta @ theta) + float(logdet) - P * math.log(d))

    for d in grid:
        assert la.log_marginal_likelihood(ll, d) == pytest.approx(dense_evidence(d), rel=1e-10)
    best = la.select_prior_precision(ll, grid)
    assert best == max(grid, key=dense_evidence) and la.prior_precision == best


def test_sample_covariance_and_predictive():
    model, data = _model_data()
    la = KroneckerLaplace.fit(model, data, strategy="projected", factor_options={"rank": 2},
                              prior_precision=2.0)
    # a sample is the mean plus the covariance root applied to the layers' noise matrices
    gen = torch.Generator().manual_seed(0)
    draw = torch.cat([t.reshape(-1) for t in la.sample(gen)])
    gen = torch.Generator().manual_seed(0)
    eps = torch.zeros(la.op.dim, dtype=torch.float64)
    for name, helper in la.op.layers.items():
        E = torch.randn(la.op.blocks[name].G.dim, la.op.blocks[name].A.dim, generator=gen,
                        dtype=torch.float64)
        for i, t in zip(la.op._index[name], helper.split_matrix(E)):
            eps[la.op.offsets[i]:la.op.offsets[i + 1]] = t.reshape(-1)
    mean = torch.cat([m.reshape(-1) for m in la.mean])
    assert torch.allclose(draw - mean, la.root() @ eps, atol=1e-12)
    # ... so the samples' covariance is the root's square, the posterior covariance
    K = la.op.to_dense()
    R = la.root().to_dense()
    cov = torch.linalg.inv(N * K + 2.0 * torch.eye(K.shape[0], dtype=K.dtype))
    assert torch.allclose(R @ R.T, cov, atol=1e-12)
    # the predictive sets the weights in place and restores the mean afterwards
    before = [p.detach().clone() for p in model.parameters()]
    probs = la.predictive(data, samples=5, seed=1)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    gen = torch.Generator().manual_seed(1)
    ref = torch.zeros_like(probs)
    for _ in range(5):
        theta = la.sample(gen)
        ref += torch.func.functional_call(
            model, {n: t for (n, _), t in zip(model.named_parameters(), theta)},
            (data[0],)).softmax(-1)
    assert torch.allclose(probs, ref / 5, atol=1e-12)
    assert torch.allclose(probs.sum(-1), torch.ones(N, dtype=probs.dtype))
    assert torch.allclose(la.map_predictive(data), model(data[0]).softmax(-1))


def test_bad_input():
    model, data = _model_data()
    with pytest.raises(ValueError, match="prior_precision|damping"):
        KroneckerLaplace.fit(model, data, prior_precision=0.0)
    with pytest.raises(ValueError, match="loss"):
        KroneckerLaplace.fit(model, data, loss="hinge")
    la = KroneckerLaplace.fit(model, data, strategy="eigh")
    with pytest.raises(ValueError, match="samples"):
        la.predictive(data, samples=0)
    with pytest.raises(ValueError, match="grid"):
        la.select_prior_precision(0.0, [])
    norm = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double().eval()
    with pytest.raises(ValueError, match="Kronecker blocks only"):
        KroneckerLaplace.fit(norm, data)


@pytest.mark.parametrize("fisher", ["exact", "mc", "empirical"])
def test_fit_from_a_loader_streams_the_kfac_factors(fisher):
    """A DataLoader gives the factors of KFACOperator.from_data (running mean over its batches,
    the MC labels drawn per chunk as there) and N = its number of samples."""
    model, (X, y) = _model_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=16)
    la = KroneckerLaplace.fit(model, loader, fisher=fisher, strategy="eigh", chunk_size=16)
    ref = KFACOperator.from_data(model, loader, fisher=fisher, strategy="eigh", chunk_size=16)
    assert la.num_samples == N
    K, R = la.op.to_dense(), ref.to_dense()
    assert (K - R).abs().max() <= 1e-12 * R.abs().max()
