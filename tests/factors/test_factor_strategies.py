"""One generic suite: every Kronecker-factor strategy against dense float64 math (singd style).

The reference is the dense EMA ``F ← ρ F + (1 − ρ) · scale · Xᵀ X`` (first update: replace). The
projected strategy represents it exactly when the data has rank ≤ r, so the data here lives in a
rank-``q`` subspace with ``q ≤ r``; the trace test uses full-rank data.
"""

from __future__ import annotations

import pytest
import torch

from natgrad.factors import (
    STRATEGIES,
    FactorRefreshError,
    KroneckerFactor,
    ProjectedFactor,
    make_factor,
)

DIM, RANK, SUBSPACE, ROWS, DECAY, DAMPING = 12, 6, 4, 5, 0.9, 0.05
ALL = ["eigh", "cholesky", "recursive", "projected"]
#: strategies that decompose in ``refresh`` (``projected`` decomposes inside its update)
DECOMPOSING = ["eigh", "cholesky", "recursive"]


def factor(strategy: str, dim: int = DIM, dtype: torch.dtype = torch.float64) -> KroneckerFactor:
    if strategy == "projected":  # constructed directly: make_factor would give eigh for dim <= r
        return ProjectedFactor(dim, rank=RANK, dtype=dtype)
    return make_factor(strategy, dim, dtype=dtype)


def batches(count: int, rank: int | None = SUBSPACE, seed: int = 0, dim: int = DIM):
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank or dim, dim, generator=gen, dtype=torch.float64)
    return [torch.randn(ROWS, rank or dim, generator=gen, dtype=torch.float64) @ basis
            for _ in range(count)]


def dense_ema(xs: list[torch.Tensor], scale: float = 1.0 / ROWS) -> torch.Tensor:
    F = None
    for x in xs:
        stat = scale * x.T @ x
        F = stat if F is None else DECAY * F + (1 - DECAY) * stat
    assert F is not None
    return F


def feed(f: KroneckerFactor, xs: list[torch.Tensor]) -> None:
    for x in xs:
        f.update(x, 1.0 / ROWS, DECAY)


def test_every_strategy_is_covered():
    assert set(ALL) == set(STRATEGIES)


@pytest.mark.parametrize("strategy", ALL)
def test_update_matches_dense_ema(strategy):
    xs = batches(7)
    f = factor(strategy)
    feed(f, xs)
    torch.testing.assert_close(f.to_dense(), dense_ema(xs), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("strategy", ALL)
def test_trace_is_exact(strategy):
    xs = batches(7, rank=None)  # full rank: the projected factor truncates, its trace must not
    f = factor(strategy)
    feed(f, xs)
    assert f.trace() == pytest.approx(float(dense_ema(xs).trace()), rel=1e-12)
    assert float(f.to_dense().trace()) == pytest.approx(f.trace(), rel=1e-10)


@pytest.mark.parametrize("strategy", ALL)
def test_inv_matmul_matches_dense_solve(strategy):
    xs = batches(7)
    f = factor(strategy)
    feed(f, xs[:3])
    f.refresh(DAMPING)
    feed(f, xs[3:])  # the recursive strategy takes the Woodbury path here
    f.refresh(DAMPING)
    v = torch.randn(DIM, 3, dtype=torch.float64)
    # the damping the factor applies (the recursive one tracks a decayed damping within its band)
    expect = torch.linalg.solve(dense_ema(xs) + f.damping * torch.eye(DIM, dtype=torch.float64), v)
    torch.testing.assert_close(f.inv_matmul(v), expect, rtol=1e-8, atol=1e-10)
    assert f.damping == pytest.approx(DAMPING, rel=1.0)  # within a factor 2


@pytest.mark.parametrize("strategy", ALL)
def test_eigenvalues_match_dense(strategy):
    xs = batches(5)
    f = factor(strategy)
    feed(f, xs)
    f.refresh(DAMPING)
    expect = torch.linalg.eigvalsh(dense_ema(xs)).flip(0)
    torch.testing.assert_close(f.eigenvalues(), expect, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("strategy", ALL)
def test_state_dict_round_trip_continues_identically(strategy):
    xs = batches(8, rank=None)
    f = factor(strategy)
    feed(f, xs[:4])
    f.refresh(DAMPING)
    g = factor(strategy)
    g.load_state_dict(f.state_dict())
    v = torch.randn(DIM, 2, dtype=torch.float64)
    assert torch.equal(f.inv_matmul(v), g.inv_matmul(v))
    for h in (f, g):
        feed(h, xs[4:])
        h.refresh(DAMPING)
    assert torch.equal(f.to_dense(), g.to_dense())
    assert torch.equal(f.inv_matmul(v), g.inv_matmul(v))
    assert f.trace() == g.trace() and f.updates == g.updates == 8


@pytest.mark.parametrize("strategy", ALL)
def test_load_state_dict_rejects_other_strategy(strategy):
    other = "eigh" if strategy != "eigh" else "cholesky"
    with pytest.raises(ValueError, match="strategy"):
        factor(strategy).load_state_dict(factor(other).state_dict())


@pytest.mark.parametrize("strategy", DECOMPOSING)
def test_refresh_failure_keeps_previous_state(strategy, monkeypatch):
    f = factor(strategy)
    feed(f, batches(3))
    f.refresh(DAMPING)
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v
              for k, v in f.state_dict().items()}
    v = torch.randn(DIM, 2, dtype=torch.float64)
    out = f.inv_matmul(v)

    def boom(self, damping, dtype):
        raise RuntimeError("linalg failure")

    monkeypatch.setattr(type(f), "_compute_inverse", boom)
    with pytest.raises(FactorRefreshError):
        f.refresh(100 * DAMPING)  # far outside the recursive strategy's free band
    after = f.state_dict()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key]), key
        else:
            assert value == after[key], key
    assert torch.equal(f.inv_matmul(v), out)


@pytest.mark.parametrize("strategy", DECOMPOSING)
def test_nonfinite_result_is_rejected(strategy, monkeypatch):
    f = factor(strategy)
    feed(f, batches(3))
    f.refresh(DAMPING)

    def nan(self, damping, dtype):
        key = "Q" if strategy == "eigh" else "P"
        return {key: torch.full_like(getattr(self, key), float("nan"))}

    monkeypatch.setattr(type(f), "_compute_inverse", nan)
    with pytest.raises(FactorRefreshError, match="non-finite"):
        f.refresh(100 * DAMPING)
    assert f.damping == pytest.approx(DAMPING, rel=1.0)


@pytest.mark.parametrize("strategy", ALL)
def test_state_bytes(strategy):
    f = factor(strategy, dim=40)
    feed(f, batches(3, dim=40, rank=None))
    f.refresh(DAMPING)
    if strategy == "projected":
        assert f.state_bytes() == (40 * RANK + RANK) * 8  # U and λ only: O(d·r)
    else:
        assert f.state_bytes() >= 40 * 40 * 8


@pytest.mark.parametrize("strategy", ALL)
def test_float32_inverse_close_to_float64(strategy):
    xs = batches(6, rank=None)
    f32, f64 = factor(strategy, dtype=torch.float32), factor(strategy)
    for f in (f32, f64):
        f.update(xs[0].float() if f is f32 else xs[0], 1.0 / ROWS, DECAY)
        f.refresh(DAMPING)
        for x in xs[1:]:
            f.update(x.float() if f is f32 else x, 1.0 / ROWS, DECAY)
            f.refresh(DAMPING)
    v = torch.randn(DIM, 2, dtype=torch.float64)
    torch.testing.assert_close(
        f32.inv_matmul(v.float()).double(), f64.inv_matmul(v), rtol=1e-3, atol=1e-4
    )


@pytest.mark.parametrize("strategy", ALL)
def test_bad_rows_shape(strategy):
    with pytest.raises(ValueError, match="rows must have shape"):
        factor(strategy).update(torch.zeros(3, DIM + 1, dtype=torch.float64), 1.0, DECAY)


def test_eigh_release_statistics_keeps_what_a_read_only_operator_reads():
    """A refreshed eigh factor without its dense ``F``: trace, diagonal, dense form, eigenpairs
    and products are those it had (float64, to rounding); an update then raises, naming why."""
    from natgrad.factors import EighFactor, kronecker_matvec

    g = torch.Generator().manual_seed(3)
    A, G = EighFactor(6, dtype=torch.float64), EighFactor(4, dtype=torch.float64)
    for f in (A, G):
        f.update(torch.randn(9, f.dim, generator=g, dtype=torch.float64), 0.2, 0.0)
        f.refresh(0.0)
    V = torch.randn(4, 6, generator=g, dtype=torch.float64)
    before = (A.trace(), A.dense_diagonal().clone(), A.to_dense().clone(),
              kronecker_matvec(V, A, G))
    A.release_statistics()
    assert A.F is None and A.trace() == before[0]
    torch.testing.assert_close(A.dense_diagonal(), before[1], rtol=0, atol=0)
    torch.testing.assert_close(A.to_dense(), before[2], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(kronecker_matvec(V, A, G), before[3], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="released"):
        A.update(torch.randn(3, 6, dtype=torch.float64), 1.0, 0.5)
