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


def _dense_solve(V: torch.Tensor, A: _Spectral, G: _Spectral, lam: float) -> torch.Tensor:
    n = A.dim * G.dim
    K = torch.kron(A.dense(), G.dense()) + lam * torch.eye(n, dtype=torch.float64)
    return torch.linalg.solve(K, V.T.reshape(-1)).reshape(A.dim, G.dim).T


def test_solve_many_batches_equal_shapes_and_matches_dense(monkeypatch):
    """Equal-shaped pairs (low rank: three, with different dampings; full rank: two) go through
    one batched product each; a mixed-rank pair and a lone shape are solved on their own. Every
    direction, its ``⟨V, D⟩`` and its in-place application equal the dense damped solve."""
    import natgrad.factors.kronecker as kron

    calls = []
    batched = kron._batched_solve
    monkeypatch.setattr(kron, "_batched_solve",
                        lambda reqs, full: calls.append((len(reqs), full)) or batched(reqs, full))
    gen = torch.Generator().manual_seed(7)
    shapes = [(7, 5, 3, 2, 0.1), (7, 5, 3, 2, 0.3), (7, 5, 3, 2, 1e-3),  # low rank, one group
              (4, 3, 4, 3, 0.2), (4, 3, 4, 3, 0.05),  # full rank, one group
              (7, 5, 7, 2, 0.1),  # A full, G low: on its own
              (6, 5, 3, 2, 0.1)]  # a shape of its own
    requests, dense = [], []
    for da, dg, ra, rg, lam in shapes:
        A, G = _Spectral(da, ra, gen), _Spectral(dg, rg, gen)
        V = torch.randn(dg, da, generator=gen, dtype=torch.float64)
        requests.append(([V[:, :-1].contiguous(), V[:, -1:].contiguous()], A, G, lam, None))
        dense.append((V, _dense_solve(V, A, G, lam)))
    out = kron.solve_many(requests)
    assert sorted(calls) == [(2, True), (3, False)]
    for D, (V, expected) in zip(out, dense):
        torch.testing.assert_close(D.dense(), expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(D.inner, (V * expected).sum(), rtol=1e-10, atol=1e-12)
        W = torch.randn_like(V)
        targets = [W[:, :-1].clone(), W[:, -1:].clone()]
        D.add_to_(targets, -0.5)
        torch.testing.assert_close(torch.cat(targets, 1), W - 0.5 * expected, rtol=1e-10,
                                   atol=1e-12)


def test_solve_many_restacks_when_a_factor_changes():
    """The stacked bases are reused only while every pair's constants are the same objects: a
    refreshed factor (new eigenpairs) or a new damping gives the new solution."""
    import natgrad.factors.kronecker as kron

    gen = torch.Generator().manual_seed(8)
    pairs = [(_Spectral(7, 3, gen), _Spectral(5, 2, gen)) for _ in range(2)]
    V = [torch.randn(5, 7, generator=gen, dtype=torch.float64) for _ in range(2)]
    kron.solve_many([([v], A, G, 0.1, None) for v, (A, G) in zip(V, pairs)])
    pairs[1][0].mu = pairs[1][0].mu * 3  # a refresh replaces the eigenvalue tensor
    for lam in (0.1, 0.7):
        out = kron.solve_many([([v], A, G, lam, None) for v, (A, G) in zip(V, pairs)])
        for D, v, (A, G) in zip(out, V, pairs):
            torch.testing.assert_close(D.dense(), _dense_solve(v, A, G, lam), rtol=1e-10,
                                       atol=1e-12)
