"""The exact damped Kronecker solve for low-rank-plus-identity factors, against dense algebra."""

from __future__ import annotations

import pytest
import torch

from natgrad.factors import kronecker_matvec, precondition, solve


class _Spectral:
    """A stand-in spectral factor ``U diag(μ) Uᵀ + σ (I − U Uᵀ)`` with known dense form."""

    spectral = True
    name = "stub"

    def __init__(self, d: int, r: int, gen: torch.Generator) -> None:
        self.dim = d
        Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
        self.U = Q[:, :r]
        self.mu = torch.rand(r, generator=gen, dtype=torch.float64) * 5 + 1
        self.sig = 0.3 if r < d else 0.0

    def eigen(self):
        return self.U, self.mu, self.sig

    def dense(self) -> torch.Tensor:
        P = self.U @ self.U.T
        return self.U @ torch.diag(self.mu) @ self.U.T + self.sig * (torch.eye(self.dim) - P)


@pytest.mark.parametrize("ra, rg", [(3, 2), (7, 2), (3, 5), (7, 5)])
def test_low_rank_solve_equals_dense_damped_inverse(ra, rg):
    gen = torch.Generator().manual_seed(ra * 10 + rg)
    A, G = _Spectral(7, ra, gen), _Spectral(5, rg, gen)
    V = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    lam = 0.1
    K = torch.kron(A.dense(), G.dense()) + lam * torch.eye(35, dtype=torch.float64)
    expected = torch.linalg.solve(K, V.T.reshape(-1)).reshape(7, 5).T
    torch.testing.assert_close(precondition(V, A, G, lam), expected, rtol=1e-10, atol=1e-12)
    # and the forward product is its inverse
    back = kronecker_matvec(expected, A, G) + lam * expected
    torch.testing.assert_close(back, V, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("ra, rg", [(3, 2), (7, 2), (3, 5), (7, 5)])
def test_factored_direction_on_column_blocks(ra, rg):
    """``solve`` on ``[∇W, ∇b]`` blocks: its dense form, its in-place application and ``⟨V, D⟩``
    agree with the dense solve of the concatenated matrix."""
    gen = torch.Generator().manual_seed(ra * 10 + rg + 1)
    A, G = _Spectral(7, ra, gen), _Spectral(5, rg, gen)
    V = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    blocks = [V[:, :6].contiguous(), V[:, 6:].contiguous()]
    expected = precondition(V, A, G, 0.1)
    D = solve(blocks, A, G, 0.1)
    torch.testing.assert_close(D.dense(), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(D.inner, (V * expected).sum(), rtol=1e-10, atol=1e-12)
    W = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    targets = [W[:, :6].clone(), W[:, 6:].clone()]
    D.add_to_(targets, -0.5)
    torch.testing.assert_close(torch.cat(targets, 1), W - 0.5 * expected, rtol=1e-10, atol=1e-12)
