"""Closed-form top eigenpairs of the K-FAC operator against a dense eigendecomposition."""

import torch
from torch import nn

from natgrad.fisher import KFACOperator, kfac_top_eigenvalues, subspace_overlap
from natgrad.fisher.kron import kfac_top_eigenpairs


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X = torch.randn(20, 1, 4, 4, dtype=torch.float64)
    return model, X, torch.randint(0, 3, (20,))


def test_closed_form_eigenpairs_match_dense():
    model, X, y = _model()
    K = KFACOperator.from_data(model, (X, y), strategy="eigh")
    D = K.to_dense()
    theta, Q = torch.linalg.eigh(D)
    for k in (1, 4, 9):
        values, vectors = kfac_top_eigenpairs(K, k)
        assert torch.allclose(values, theta.flip(0)[:k], rtol=1e-10)
        assert torch.allclose(values, kfac_top_eigenvalues(K, k), rtol=1e-12)
        # eigenvectors of D, orthonormal, spanning the dense top-k eigenspace
        assert float((D @ vectors - vectors * values).norm()) < 1e-10 * float(values[0])
        assert torch.allclose(vectors.T @ vectors, torch.eye(k, dtype=torch.float64), atol=1e-12)
        assert abs(subspace_overlap(vectors, Q.flip(1)[:, :k]) - 1.0) < 1e-8


def test_closed_form_refuses_what_it_cannot_give():
    model, X, y = _model()
    assert kfac_top_eigenpairs(KFACOperator.from_data(model, (X, y), strategy="cholesky"),
                               3) is None  # not spectral
    K = KFACOperator.from_data(model, (X, y), strategy="projected",
                               factor_options={"rank": 1})
    # rank-1 factors: the 2nd value would come from a remainder σ(I − UUᵀ) in some layer
    pairs = kfac_top_eigenpairs(K, 40)
    assert pairs is None
    values, vectors = kfac_top_eigenpairs(K, 1)
    D = K.to_dense()
    assert float((D @ vectors - vectors * values).norm()) < 1e-10 * float(values[0])
