"""The ``eigh`` strategy's SOAP-style refresh (``refresh="power"``): one step of orthogonal
iteration from the previous basis after a first full ``eigh``, checked in float64 against
``torch.linalg.eigh`` of the dense factor."""

from __future__ import annotations

import pytest
import torch

from natgrad.factors import EighFactor, FactorRefreshError, make_factor
from natgrad.factors.eigh import EighOptions, power_refresh

DIM = 8


def spd(eigenvalues: torch.Tensor, seed: int) -> torch.Tensor:
    """``Q diag(λ) Qᵀ`` with a random orthogonal ``Q``."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=gen,
                                       dtype=torch.float64))
    return (Q * eigenvalues) @ Q.T


def power_factor(F: torch.Tensor) -> EighFactor:
    f = make_factor("eigh", F.shape[0], {"refresh": "power"}, dtype=torch.float64)
    f.update_moment(F, 1.0, 0.9)
    return f


def test_options_are_checked_once_by_name():
    assert EighOptions().refresh == "eigh"
    with pytest.raises(ValueError, match=r"refresh='qr'.*\['eigh', 'power'\]"):
        make_factor("eigh", 4, {"refresh": "qr"})
    assert make_factor("eigh", 4, refresh="power").describe() == "eigh(d=4, power)"


def test_first_refresh_is_a_full_eigh():
    F = spd(torch.linspace(1, 8, DIM, dtype=torch.float64), 0)
    f, g = power_factor(F), make_factor("eigh", DIM, dtype=torch.float64)
    g.update_moment(F, 1.0, 0.9)
    f.refresh(0.0)
    g.refresh(0.0)
    assert torch.equal(f.Q, g.Q) and torch.equal(f.lam, g.lam)


def test_repeated_refreshes_converge_to_the_eigenbasis_of_a_fixed_factor():
    """First basis from another factor; then ``F`` held fixed (eigenvalues 2^0 … 2^-7, so column
    ``i`` converges at rate ≤ 1/2): after 60 refreshes ``|Qᵀ Q_eigh| = I`` and ``λ`` are the
    eigenvalues, descending."""
    lam = 2.0 ** -torch.arange(DIM, dtype=torch.float64)
    F0, F = spd(torch.linspace(1, 2, DIM, dtype=torch.float64), 1), spd(lam, 2)
    f = power_factor(F0)
    f.refresh(0.0)
    f.F = F.clone()
    f.refresh(0.0)
    first = (f.Q.T @ torch.linalg.eigh(F)[1].flip(1)).abs()
    assert (first.diagonal() < 0.99).any()  # one step is not the eigenbasis yet
    for _ in range(59):
        f.refresh(0.0)
    torch.testing.assert_close((f.Q.T @ torch.linalg.eigh(F)[1].flip(1)).abs(),
                               torch.eye(DIM, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(f.lam, lam, atol=1e-12, rtol=0)
    torch.testing.assert_close(f.Q.T @ f.Q, torch.eye(DIM, dtype=torch.float64))


def test_an_eigenbasis_is_a_fixed_point():
    F = spd(torch.linspace(1, 8, DIM, dtype=torch.float64), 3)
    lam, Q = torch.linalg.eigh(F)
    Qn, lam_n = power_refresh(F, Q)  # ascending in, descending out
    torch.testing.assert_close(Qn, Q.flip(1) * torch.sign((Q.flip(1) * Qn).sum(0)))
    torch.testing.assert_close(lam_n, lam.flip(0))


def test_state_dict_round_trip_continues_identically():
    F0, F1 = spd(torch.linspace(1, 3, DIM, dtype=torch.float64), 4), \
        spd(torch.linspace(1, 9, DIM, dtype=torch.float64), 5)
    f = power_factor(F0)
    f.refresh(0.0)
    g = make_factor("eigh", DIM, {"refresh": "power"}, dtype=torch.float64)
    g.load_state_dict(f.state_dict())
    for h in (f, g):
        h.update_moment(F1, 1.0, 0.5)
        h.refresh(0.0)
        h.refresh(0.0)
    assert torch.equal(f.Q, g.Q) and torch.equal(f.lam, g.lam)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_factor_keeps_the_previous_basis(bad):
    f = power_factor(spd(torch.linspace(1, 8, DIM, dtype=torch.float64), 6))
    f.refresh(0.0)
    Q, lam = f.Q.clone(), f.lam.clone()
    f.F[2, 3] = f.F[3, 2] = bad
    with pytest.raises(FactorRefreshError):
        f.refresh(0.0)
    assert torch.equal(f.Q, Q) and torch.equal(f.lam, lam) and f.refreshed
