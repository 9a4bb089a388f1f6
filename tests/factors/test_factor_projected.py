"""The projected strategy: exactness at full rank and for rank-r factors, trace tracking, long-run
accuracy on a gapped spectrum, option validation and the fallback for narrow layers."""

from __future__ import annotations

import pytest
import torch

from natgrad.factors import (
    EighFactor,
    ProjectedFactor,
    make_factor,
    precondition,
    refresh_pair,
)

f64 = torch.float64


def test_full_rank_projected_equals_eigh_kfac_update():
    gen = torch.Generator().manual_seed(0)
    d_a, d_g, n = 9, 7, 4  # n < d: the rank grows over the first updates, then U is d × d
    pa, pg = ProjectedFactor(d_a, rank=d_a, dtype=f64), ProjectedFactor(d_g, rank=d_g, dtype=f64)
    ea, eg = EighFactor(d_a, dtype=f64), EighFactor(d_g, dtype=f64)
    V = torch.randn(d_g, d_a, generator=gen, dtype=f64)
    for _step in range(6):
        a = torch.randn(n, d_a, generator=gen, dtype=f64)
        g = torch.randn(n, d_g, generator=gen, dtype=f64)
        for fa, fg in ((pa, pg), (ea, eg)):
            fa.update(a, 1.0 / n, 0.95)
            fg.update(g, 1.0, 0.95)
            refresh_pair(fa, fg, 1e-3)
        torch.testing.assert_close(
            precondition(V, pa, pg, 1e-3), precondition(V, ea, eg, 1e-3), rtol=1e-9, atol=1e-10
        )
        torch.testing.assert_close(pa.to_dense(), ea.F, rtol=1e-12, atol=1e-12)
    assert pa.current_rank == d_a and pa.sigma == 0.0


def test_exactly_rank_r_factor_is_represented_exactly():
    gen = torch.Generator().manual_seed(1)
    d, r = 30, 5
    basis = torch.randn(r, d, generator=gen, dtype=f64)
    f = ProjectedFactor(d, rank=r, sketch_size=r, dtype=f64)  # rows are sketched (n = 16 > k)
    F = None
    for _ in range(10):
        x = torch.randn(16, r, generator=gen, dtype=f64) @ basis
        f.update(x, 1 / 16, 0.9)
        F = x.T @ x / 16 if F is None else 0.9 * F + 0.1 * x.T @ x / 16
    assert f.current_rank == r
    assert f.sigma == pytest.approx(0.0, abs=1e-10)
    torch.testing.assert_close(f.to_dense(), F, rtol=1e-10, atol=1e-10)
    U, lam, _ = f.eigen()
    torch.testing.assert_close(U.T @ U, torch.eye(r, dtype=f64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_tracked_trace_equals_dense_trace(dtype):
    gen = torch.Generator().manual_seed(2)
    d = 50
    f = ProjectedFactor(d, rank=4, dtype=dtype)
    F = torch.zeros(d, d, dtype=f64)
    for i in range(20):
        x = torch.randn(8, d, generator=gen, dtype=f64)
        f.update(x.to(dtype), 0.125, 0.9)
        F = x.T @ x / 8 if i == 0 else 0.9 * F + 0.1 * x.T @ x / 8
    rel = 1e-6 if dtype == torch.float32 else 1e-12
    assert f.trace() == pytest.approx(float(F.trace()), rel=rel)
    # σ carries the rest of the trace
    assert float(f.lam.double().sum()) + (d - 4) * f.sigma == pytest.approx(f.trace(), rel=1e-5)


def test_long_run_gapped_spectrum_matches_dense_ema():
    torch.manual_seed(3)
    d, r, n = 64, 8, 16
    Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=f64))
    ev = torch.cat([torch.linspace(10, 3, r, dtype=f64), 0.1 * torch.rand(d - r, dtype=f64)])
    C = Q * ev.sqrt()
    f = ProjectedFactor(d, rank=r, sketch_size=n)  # float32; k = n: the rows enter unsketched
    g = ProjectedFactor(d, rank=r)  # default k = r/2 = 4 < n: sketched
    F = torch.zeros(d, d, dtype=f64)
    for i in range(1000):
        x = torch.randn(n, d, dtype=f64) @ C.T
        f.update(x.float(), 1 / n, 0.95)
        g.update(x.float(), 1 / n, 0.95)
        F = x.T @ x / n if i == 0 else 0.95 * F + 0.05 * x.T @ x / n
    evals, evecs = torch.linalg.eigh(F)
    top, Ud = evals.flip(0)[:r], evecs.flip(1)[:, :r]
    for h, tol in ((f, 1e-4), (g, 1e-2)):
        torch.testing.assert_close(h.lam.double(), top, rtol=tol, atol=0)
        overlap = torch.linalg.svdvals(Ud.T @ h.U.double()).min()
        assert overlap > 1 - 10 * tol
        assert h.trace() == pytest.approx(float(F.trace()), rel=1e-5)


def test_energy_mode_picks_the_rank_per_layer():
    gen = torch.Generator().manual_seed(4)
    d = 40
    scales = torch.tensor([[10.0], [5.0], [3.0]], dtype=f64)
    basis = torch.randn(3, d, generator=gen, dtype=f64) * scales
    f = ProjectedFactor(d, energy=0.999, max_rank=20, dtype=f64)
    for _ in range(3):
        f.update(torch.randn(12, 3, generator=gen, dtype=f64) @ basis
                 + 1e-3 * torch.randn(12, d, generator=gen, dtype=f64), 1 / 12, 0.9)
    assert f.current_rank == 3
    assert "energy=0.999" in f.describe()
    assert f.state_summary() == "rank now 3"
    fixed = ProjectedFactor(d, rank=3, dtype=f64)
    assert fixed.state_summary() == ""  # nothing chosen at run time


def test_inv_matmul_closed_form_and_describe():
    gen = torch.Generator().manual_seed(5)
    f = ProjectedFactor(20, rank=3, dtype=f64)
    f.update(torch.randn(30, 20, generator=gen, dtype=f64), 1 / 30, 0.9)
    f.refresh(0.1)
    v = torch.randn(20, 4, generator=gen, dtype=f64)
    dense = f.to_dense() + 0.1 * torch.eye(20, dtype=f64)
    torch.testing.assert_close(f.inv_matmul(v), torch.linalg.solve(dense, v))
    assert f.describe() == "projected(d=20, r=3)"
    assert f.sigma > 0


def test_create_falls_back_to_eigh_for_narrow_layers():
    assert isinstance(make_factor("projected", 10, rank=16), EighFactor)
    assert isinstance(make_factor("projected", 16, rank=16), EighFactor)
    wide = make_factor("projected", 17, rank=16, dtype=f64)
    assert isinstance(wide, ProjectedFactor) and wide.dtype == f64
    assert isinstance(make_factor("projected", 100, energy=0.9, max_rank=200), EighFactor)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"rank": 0}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"energy": 0.0}, "energy"),
        ({"energy": 1.5}, "energy"),
        ({"energy": 0.9, "max_rank": -1}, "max_rank"),
        ({"sketch_size": 0}, "sketch_size"),
        ({"sketch": "srht"}, "sketch"),
        ({"max_rows": 0}, "max_rows"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_options(options, match):
    with pytest.raises(ValueError, match=match):
        ProjectedFactor(100, **options)
    with pytest.raises(ValueError, match=match):
        make_factor("projected", 100, **options)


@pytest.mark.parametrize("sketch", ["gaussian", "rows"])
def test_conv_sized_row_counts_are_sketched_and_subsampled(sketch):
    gen = torch.Generator().manual_seed(6)
    d, r = 60, 4
    basis = torch.randn(r, d, generator=gen, dtype=f64)
    rows = torch.randn(5000, r, generator=gen, dtype=f64) @ basis  # e.g. m·T patch rows
    f = ProjectedFactor(d, rank=r, sketch=sketch, max_rows=500, dtype=f64)
    f.update(rows, 1 / 5000, 0.9)
    # the subspace is exact; eigenvalues are unbiased estimates from 500 rows; trace uses all rows
    F = rows.T @ rows / 5000
    assert f.trace() == pytest.approx(float(F.trace()), rel=1e-12)
    P = basis.T @ torch.linalg.solve(basis @ basis.T, basis)  # projector onto the data subspace
    torch.testing.assert_close(f.U @ f.U.T, P, rtol=0, atol=1e-8)


def _state(f: ProjectedFactor) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in f.state_dict().items()}


def _assert_same_state(f: ProjectedFactor, before: dict) -> None:
    for key, value in f.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, before[key]), key
        else:
            assert value == before[key], key


def test_failed_or_nonfinite_update_keeps_previous_state(monkeypatch):
    """The projected strategy decomposes inside its update: a failed ``eigh`` or non-finite rows
    leave the state (and the number of updates) untouched, with a warning."""
    import natgrad.factors.projected as projected

    gen = torch.Generator().manual_seed(7)
    f = ProjectedFactor(30, rank=4, dtype=f64)
    for _ in range(3):
        f.update(torch.randn(6, 30, generator=gen, dtype=f64), 1 / 6, 0.9)
    before = _state(f)
    bad = torch.randn(6, 30, generator=gen, dtype=f64)
    bad[2, 5] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        f.update(bad, 1 / 6, 0.9)
    bad[2, 5] = float("inf")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        f.update(bad, 1 / 6, 0.9)

    def boom(M):
        raise torch.linalg.LinAlgError("eigh did not converge")

    monkeypatch.setattr(projected, "small_eigh", boom)
    with pytest.warns(RuntimeWarning, match="eigh failed"):
        f.update(torch.randn(6, 30, generator=gen, dtype=f64), 1 / 6, 0.9)
    _assert_same_state(f, before)  # the skipped updates are not counted either


@pytest.mark.parametrize("dtype, tol", [(f64, 1e-10), (torch.float32, 2e-4)])
def test_batched_update_equals_one_by_one(dtype, tol, monkeypatch):
    """``update_factors`` stacks steady-state projected factors of different widths into one
    batched refresh; the result equals updating them one by one (same sketches), and factors
    outside the steady state (rank not yet filled, other row counts) take the plain path."""
    from natgrad.factors import update_factors

    gen = torch.Generator().manual_seed(8)
    dims, r, n = (40, 57, 33), 6, 20

    def make():
        return [ProjectedFactor(d, rank=r, seed=i, dtype=dtype) for i, d in enumerate(dims)]

    batched, single = make(), make()
    taken = []
    group_update = ProjectedFactor._update_group

    def spy(group, decay):
        taken.append(group_update(group, decay))
        return taken[-1]

    monkeypatch.setattr(ProjectedFactor, "_update_group", staticmethod(spy))
    for step in range(12):
        rows = [torch.randn(n if step % 5 else n + 3, d, generator=gen, dtype=f64).to(dtype)
                for d in dims]
        update_factors([(f, x, 1 / n) for f, x in zip(batched, rows)], 0.9)
        for f, x in zip(single, rows):
            f.update(x, 1 / n, 0.9)
        for fb, fs in zip(batched, single):
            assert fb.updates == fs.updates and fb.current_rank == fs.current_rank
            assert fb.tr == pytest.approx(fs.tr, rel=1e-12 if dtype == f64 else 1e-6)
            torch.testing.assert_close(fb.lam, fs.lam, rtol=tol, atol=tol)
            torch.testing.assert_close(fb.U @ fb.U.T, fs.U @ fs.U.T, rtol=tol, atol=tol)
            assert fb.sigma == pytest.approx(fs.sigma, rel=tol, abs=tol)
    assert taken and not any(taken)  # the batched path ran (once the ranks were filled)


def test_batched_update_leaves_only_dependent_sketches_to_the_single_path(monkeypatch):
    """One factor whose rows span fewer directions than its rank plus sketch (a depthwise
    convolution's patches on a small feature map): its nearly dependent sketch takes the single
    path, the others stay batched; the result equals updating them one by one."""
    from natgrad.factors import update_factors

    gen = torch.Generator().manual_seed(9)
    dims, r, n = (40, 57, 33, 45), 6, 20
    basis = torch.randn(8, 45, generator=gen, dtype=f64)  # factor 3 sees an 8-dim subspace

    def make():
        return [ProjectedFactor(d, rank=r, seed=i, dtype=f64) for i, d in enumerate(dims)]

    batched, single = make(), make()
    left: list = []
    group_update = ProjectedFactor._update_group

    def spy(group, decay):
        out = group_update(group, decay)
        left.append([dims.index(item.factor.dim) for item in out])
        return out

    monkeypatch.setattr(ProjectedFactor, "_update_group", staticmethod(spy))
    for _ in range(6):
        rows = [torch.randn(n, d, generator=gen, dtype=f64) for d in dims[:3]]
        rows.append(torch.randn(n, 8, generator=gen, dtype=f64) @ basis)
        update_factors([(f, x, 1 / n) for f, x in zip(batched, rows)], 0.9)
        for f, x in zip(single, rows):
            f.update(x, 1 / n, 0.9)
    for fb, fs in zip(batched, single):
        assert fb.updates == fs.updates
        torch.testing.assert_close(fb.lam, fs.lam, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(fb.U @ fb.U.T, fs.U @ fs.U.T, rtol=1e-10, atol=1e-10)
    assert [3] in left  # only the dependent one left the batch


def test_given_squared_norm_equals_computed():
    """``update(..., sq_norm=‖rows‖²)`` (as the optimizer passes it) is the same update as letting
    the factor compute the norm, on the single and on the batched path."""
    from natgrad.factors import FactorUpdate, update_factors

    gen = torch.Generator().manual_seed(3)
    dims, n = (30, 41), 12
    given = [ProjectedFactor(d, rank=5, seed=i, dtype=f64) for i, d in enumerate(dims)]
    computed = [ProjectedFactor(d, rank=5, seed=i, dtype=f64) for i, d in enumerate(dims)]
    for _ in range(6):
        rows = [torch.randn(n, d, generator=gen, dtype=f64) for d in dims]
        update_factors([FactorUpdate(f, x, 1 / n, float((x * x).sum())) for f, x in
                        zip(given, rows)], 0.9)
        update_factors([(f, x, 1 / n) for f, x in zip(computed, rows)], 0.9)
    for a, b in zip(given, computed):
        assert a.tr == pytest.approx(b.tr, rel=1e-14)
        torch.testing.assert_close(a.lam, b.lam)
        torch.testing.assert_close(a.U @ a.U.T, b.U @ b.U.T)
