"""The recursive strategy: Woodbury updates against Cholesky inverses, damping drift, guards."""

from __future__ import annotations

import pytest
import torch

from natgrad.factors import CholeskyFactor, RecursiveFactor, make_factor


def _run(dtype: torch.dtype, steps: int = 60, d: int = 24, n: int = 4, **options):
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(d, d, generator=gen, dtype=torch.float64) / d**0.5
    rec = RecursiveFactor(d, dtype=dtype, **options)
    chol = CholeskyFactor(d, dtype=torch.float64)
    worst = 0.0
    for _ in range(steps):
        x = torch.randn(n, d, generator=gen, dtype=torch.float64) @ mix
        rec.update(x.to(dtype), 1 / n, 0.95)
        chol.update(x, 1 / n, 0.95)
        rec.refresh(0.1)
        chol.refresh(rec.damping)  # the damping P holds (tracked; within the band of 0.1)
        err = (rec.P.double() - chol.P).norm() / chol.P.norm()
        worst = max(worst, float(err))
    return rec, chol, worst


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-8), (torch.float32, 1e-3)])
def test_recursive_inverse_matches_cholesky(dtype, tol):
    rec, _, worst = _run(dtype)
    assert worst < tol
    # the Woodbury path did the work: only the damping re-injections were exact refreshes
    assert rec.exact_refreshes <= 60 // 13 + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stays_symmetric_positive_definite(dtype):
    rec, _, _ = _run(dtype, steps=200, n=2)
    assert torch.equal(rec.P, rec.P.T)
    assert float(torch.linalg.eigvalsh(rec.P.double()).min()) > 0
    assert rec.residual() < rec.residual_tol


def test_damping_band_and_exact_refresh_on_change():
    rec, chol, _ = _run(torch.float64, steps=5)
    n0 = rec.exact_refreshes
    rec.refresh(0.1 * 1.5)  # inside the band (δ_eff ≈ 0.08): free, P unchanged
    assert rec.exact_refreshes == n0 and rec.damping < 0.1
    rec.refresh(10.0)  # outside: exact Cholesky refresh at the requested damping
    assert rec.exact_refreshes == n0 + 1 and rec.damping == 10.0
    eye = torch.eye(rec.dim, dtype=torch.float64)
    torch.testing.assert_close(rec.P, torch.linalg.inv(rec.F + 10.0 * eye))
    exact = RecursiveFactor(rec.dim, damping_tol=1.0, dtype=torch.float64)
    exact.load_state_dict(rec.state_dict())
    exact.refresh(10.0 * 1.01)  # damping_tol=1: any change refreshes exactly
    assert exact.damping == pytest.approx(10.1)


def test_residual_guard_triggers_exact_refresh():
    rec, _, _ = _run(torch.float64, steps=3)
    rec.refresh(0.1)
    rec.P = rec.P + 1e-3 * torch.eye(rec.dim, dtype=torch.float64)  # corrupt P
    assert rec.residual() > rec.residual_tol
    n0 = rec.exact_refreshes
    rec.update(torch.randn(2, rec.dim, dtype=torch.float64), 0.5, 0.95)
    assert rec.exact_refreshes == n0 + 1
    assert rec.residual() < rec.residual_tol


def test_wide_batches_use_exact_refresh_and_projection():
    gen = torch.Generator().manual_seed(1)
    rec = RecursiveFactor(10, dtype=torch.float64)
    rec.update(torch.randn(30, 10, generator=gen, dtype=torch.float64), 1 / 30, 0.9)
    rec.refresh(0.1)
    rec.update(torch.randn(30, 10, generator=gen, dtype=torch.float64), 1 / 30, 0.9)  # n > d/2
    eye = torch.eye(10, dtype=torch.float64)
    torch.testing.assert_close(rec.P, torch.linalg.inv(rec.F + 0.1 * eye))
    proj = RecursiveFactor(40, sketch_size=3, dtype=torch.float64)
    basis = torch.randn(3, 40, generator=gen, dtype=torch.float64)
    x = torch.randn(50, 3, generator=gen, dtype=torch.float64) @ basis
    proj.update(x, 1 / 50, 0.9)  # rank-3 data: the rank-3 projection is exact
    torch.testing.assert_close(proj.F, x.T @ x / 50)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"damping_tol": 0.5}, "damping_tol"),
        ({"residual_tol": 0.0}, "residual_tol"),
        ({"probes": -1}, "probes"),
        ({"sketch_size": 0}, "sketch_size"),
        ({"woodbury_max_rows": 0}, "woodbury_max_rows"),
    ],
)
def test_invalid_options(options, match):
    with pytest.raises(ValueError, match=match):
        make_factor("recursive", 10, **options)
