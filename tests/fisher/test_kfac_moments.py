"""K-FAC factors from dense moments (strategies with update_moment) equal the rows path."""

import pytest
import torch
from torch import nn

from natgrad.curvature.data import gram64 as _gram64
from natgrad.fisher import KFACOperator
from natgrad.fisher.kfac import layer_statistics


def test_gram64_blocks_and_tail():
    X = torch.randn(10, 3, dtype=torch.float64)
    ref = X.T @ X
    for block in (1, 3, 4, 10, 64):  # whole blocks, a tail, no whole block
        assert torch.allclose(_gram64(X, block), ref, rtol=1e-14, atol=1e-14)
    X32 = torch.randn(50_000, 4) + 1.0  # float32: blocks summed in float64
    ref = X32.double().T @ X32.double()
    assert float((_gram64(X32) - ref).norm() / ref.norm()) < 1e-6


@pytest.mark.parametrize("strategy", ["eigh", "cholesky"])
def test_moments_equal_rows(strategy):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(2 * 5 * 5, 3)).double()
    X, y = torch.randn(30, 1, 5, 5, dtype=torch.float64), torch.randint(0, 3, (30,))
    fast = KFACOperator.from_data(model, (X, y), strategy=strategy, chunk_size=7)
    layers, stats, n = layer_statistics(model, (X, y), chunk_size=7)
    roots = {k: (a.root(), g.root(), T) for k, (a, g, T) in stats.items()}  # rows / roots
    slow = KFACOperator.from_statistics(model, layers, roots, n, strategy)
    for name in fast.factors:
        for f, s in zip(fast.factors[name], slow.factors[name]):
            assert torch.allclose(f.to_dense(), s.to_dense(), rtol=1e-10, atol=1e-12)
