import math

import torch

from natgrad.factors import make_factor
from natgrad.fisher import (
    LinearOperator,
    condition_number,
    effective_dimension,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    kron_logdet,
    kron_top_eigenvalues,
    kron_trace,
    lanczos_topk,
    quadrature,
    relative_error,
    slq_logdet,
    spectral_density,
    subspace_overlap,
)


class Dense(LinearOperator):
    def __init__(self, M):
        super().__init__(["w"], [M.shape[:1]], M.dtype)
        self.M = M

    def _matmat(self, V):
        return self.M @ V


def random_psd(n=200, seed=0, decay=0.9):
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    lam = 10.0 * decay ** torch.arange(n, dtype=torch.float64) + 1e-3
    return Q @ torch.diag(lam) @ Q.T, lam, Q


def test_lanczos_topk_matches_spectrum():
    M, lam, Q = random_psd()
    res = lanczos_topk(Dense(M), k=8, tol=1e-6, max_steps=120)
    assert res.converged and float(res.residuals.max()) < 1e-6
    assert torch.allclose(res.values, lam[:8], rtol=1e-8)
    assert subspace_overlap(res.vectors, Q[:, :8]) > 1 - 1e-8
    assert condition_number(res, 0.0, smallest=float(lam.min())) == float(lam[0] / lam.min())


def test_hutchinson_and_hutchpp_within_stderr():
    M, lam, _ = random_psd(decay=0.99)
    op = Dense(M)
    true = float(lam.sum())
    for seed in range(3):
        h = hutchinson_trace(op, probes=64, seed=seed)
        assert abs(h.value - true) < 4 * h.stderr
        hp = hutchpp_trace(op, matvecs=60, seed=seed)
        assert abs(hp.value - true) < 4 * hp.stderr + 1e-9
    d = hutchinson_diagonal(op, probes=200, seed=1)
    z = (d.value - M.diagonal()) / d.stderr
    assert float((z.abs() < 4).double().mean()) > 0.97


def test_slq_logdet_trace_and_density():
    M, lam, _ = random_psd(n=300, decay=0.97)
    op = Dense(M)
    quad = quadrature(op, probes=16, steps=40, seed=0)
    for damping in (1e-2, 1.0):
        est = slq_logdet(quad=quad, damping=damping)
        true = float(torch.log(lam + damping).sum())
        assert abs(est.value - true) < 4 * est.stderr + 1e-6 * abs(true)
    eff = effective_dimension(quad=quad, z=0.1)
    true = float((lam / (lam + 0.1)).sum())
    assert abs(eff.value - true) < 4 * eff.stderr + 1e-6
    dens = spectral_density(quad=quad, num_points=400)
    mass = float(torch.trapezoid(dens.density, dens.grid))
    assert abs(mass - 1.0) < 0.02
    logd = spectral_density(quad=quad, num_points=400, log_grid=True)
    assert logd.grid.min() > 0


def test_kron_closed_forms_against_dense():
    gen = torch.Generator().manual_seed(0)
    Xa = torch.randn(30, 6, generator=gen, dtype=torch.float64)
    Xg = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    A = make_factor("eigh", 6, dtype=torch.float64)
    G = make_factor("eigh", 4, dtype=torch.float64)
    A.update(Xa, 1 / 30, 0.0)
    G.update(Xg, 1 / 30, 0.0)
    A.refresh(0.0)
    G.refresh(0.0)
    K = torch.kron(A.to_dense(), G.to_dense())
    ev = torch.linalg.eigvalsh(K).flip(0)
    assert torch.allclose(kron_top_eigenvalues(A, G, 5), ev[:5], rtol=1e-10)
    assert math.isclose(kron_trace(A, G), float(torch.trace(K)), rel_tol=1e-10)
    assert math.isclose(kron_logdet(A, G), float(torch.logdet(K)), rel_tol=1e-8)
    eye = torch.eye(24, dtype=torch.float64)
    assert math.isclose(kron_logdet(A, G, 0.3), float(torch.logdet(K + 0.3 * eye)), rel_tol=1e-10)


def test_relative_error_of_perturbation():
    M, _, _ = random_psd()
    op = Dense(M)
    assert relative_error(op, op, probes=4).value < 1e-12
    err = relative_error(op, 1.1 * op, probes=4)
    assert abs(err.value - 0.1) < 1e-10


def test_slq_error_bar_covers_the_quadrature_bias():
    """With 5 Lanczos steps and a small damping the quadrature bias dwarfs the probe spread
    (the stderr alone misses the truth by many standard errors); ``error = stderr + bias``
    covers it."""
    M, lam, _ = random_psd(200, decay=0.9)
    op = Dense(M)
    damping = 1e-3
    truth = float(torch.log(lam + damping).sum())
    stderr_only, covered = [], []
    for seed in range(4):
        est = slq_logdet(op, damping=damping, probes=8, steps=5, seed=seed)
        assert est.bias > 0 and est.error == est.stderr + est.bias
        stderr_only.append(abs(est.value - truth) / est.stderr)
        covered.append(abs(est.value - truth) / est.error)
    assert min(stderr_only) > 5  # the failure this guards against
    assert max(covered) < 3
    short = slq_logdet(op, damping=damping, probes=8, steps=5, seed=0)
    long = slq_logdet(op, damping=damping, probes=8, steps=60, seed=0)
    assert long.bias < 0.1 * short.bias  # the quadrature error vanishes with the steps


def test_quadrature_caps_the_bases_it_holds(monkeypatch):
    import natgrad.fisher.slq as slq

    M, _, _ = random_psd(n=60)
    op = Dense(M)
    widths = []
    real = slq.tridiagonalize
    monkeypatch.setattr(slq, "tridiagonalize",
                        lambda op, V, steps: widths.append(V.shape[1]) or real(op, V, steps))
    two_runs = 2 * 10 * 60 * 8  # bytes of two float64 bases of 10 steps
    capped = quadrature(op, probes=5, steps=10, seed=3, max_basis_bytes=two_runs)
    assert widths == [2, 2, 1]
    widths.clear()
    one = quadrature(op, probes=5, steps=10, seed=3, max_basis_bytes=1)  # at least one run
    assert widths == [1] * 5
    assert torch.equal(one.nodes, quadrature(op, probes=5, steps=10, seed=3, batch=1).nodes)
    assert capped.nodes.shape == one.nodes.shape == (5, 10)
