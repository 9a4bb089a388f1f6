"""The spectrum from the rows' Gram matrix (natgrad.fisher.dual) against dense float64
references: the Gram itself, the eigenvalues ``F`` shares with it, the lifted eigenvectors, and
``analyze(spectrum="gram")`` end to end (exact log det, effective dimension and density, top
eigenpairs, per-layer blocks, overlaps) next to ``spectrum="lanczos"``."""

import math

import pytest
import torch
from torch import nn

from natgrad.fisher import dual
from natgrad.fisher.analysis import analyze
from natgrad.fisher.budget import GB, plan_analysis
from natgrad.fisher.dense import dense_ggn
from natgrad.fisher.ggn import ExactFisher
from natgrad.fisher.rows import RowFisher


def _close(a, b, rtol=1e-9, atol=1e-12):
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    assert torch.allclose(a, b, rtol=rtol, atol=atol), (a, b)


def _mlp():
    """``n = N·C = 36`` rows against ``P = 953`` parameters; a LayerNorm's parameters are rows
    outside the Kronecker blocks (dense rows)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 30), nn.LayerNorm(30), nn.Tanh(), nn.Linear(30, 20),
                          nn.Tanh(), nn.Linear(20, 3)).double()
    X, y = torch.randn(12, 6, dtype=torch.float64), torch.randint(0, 3, (12,))
    return model, X, y


CASES = {"mlp": _mlp}


@pytest.fixture(params=["mlp", "cnn"])
def case(request, tiny_cnn):
    return _mlp() if request.param == "mlp" else tiny_cnn


def _dense_rows(rows: RowFisher) -> torch.Tensor:
    """``U`` ``(N R, P)`` from the blocks' dense rows."""
    N, R = rows.num_samples, rows.rows_per_sample
    U = torch.zeros(N, R, rows.dim, dtype=rows.dtype)
    for b in rows.blocks:
        U[:, :, b.cols] = b.dense_rows()
    return U.reshape(N * R, rows.dim)


def test_row_gram_is_the_rows_gram_and_shares_the_fishers_eigenvalues(case):
    model, X, y = case
    rows = RowFisher.from_ggn(ExactFisher(model, (X, y)))
    U = _dense_rows(rows)
    K = rows.row_gram()
    _close(K, U @ U.T)
    F = dense_ggn(model, X)
    n, N = K.shape[0], rows.num_samples
    assert n < rows.dim
    _close(dual.gram_eigenvalues(K, N).flip(0), torch.linalg.eigvalsh(F).flip(0)[:n],
           rtol=1e-8, atol=1e-11)
    # every block's Gram is its own rows' (Kronecker and dense alike)
    for b in rows.blocks:
        Ub = b.dense_rows().reshape(n, -1)
        _close(b.row_gram(), Ub @ Ub.T)


@pytest.mark.parametrize("dense_max", [dual.DENSE_EIGH_MAX, 4])
def test_lifted_eigenpairs_are_the_fishers(case, dense_max, monkeypatch):
    """Top eigenpairs of the Gram (dense eigh, or Lanczos on products with it), lifted to
    ``Uᵀu/‖Uᵀu‖``: eigenvectors of the dense Fisher with its eigenvalues."""
    monkeypatch.setattr(dual, "DENSE_EIGH_MAX", dense_max)
    model, X, y = case
    rows = RowFisher.from_ggn(ExactFisher(model, (X, y)))
    F = dense_ggn(model, X)
    lam, Q = torch.linalg.eigh(F)
    pairs = dual.gram_topk(rows.row_gram(), rows.num_samples, 3, tol=1e-8)
    _close(pairs.values, lam.flip(0)[:3], rtol=1e-8)
    assert ("Lanczos" in pairs.method) == (dense_max == 4)
    for i, (v, norm) in enumerate(dual.lifted(rows, pairs.dual)):
        _close(F @ v, pairs.values[i] * v, rtol=1e-6, atol=1e-9)
        _close(norm ** 2, rows.num_samples * pairs.values[i], rtol=1e-8)
    assert float(dual.lifted_residuals(rows, rows, pairs).max()) < 1e-7
    # the overlap with a basis, without forming the lifted vectors
    W = Q.flip(1)[:, :3]
    assert abs(dual.lifted_overlap(rows, pairs, W) - 1.0) < 1e-8
    W2 = Q.flip(1)[:, 1:5]  # shares two of the three vectors
    assert abs(dual.lifted_overlap(rows, pairs, W2) - 2 / 3) < 1e-8


def test_exact_quadrature_gives_exact_trace_functions(tiny_mlp):
    model, X, y = tiny_mlp
    F = dense_ggn(model, X)
    lam = torch.linalg.eigvalsh(F).clamp_min(0)
    top = lam.flip(0)[:len(X) * 3]
    quad = dual.exact_quadrature(top, F.shape[0])  # the others are 0: the rank is ≤ N·C
    from natgrad.fisher.slq import effective_dimension, slq_logdet

    ld = slq_logdet(quad=quad, damping=1e-3)
    assert ld.exact and ld.stderr == 0.0
    _close(ld.value, torch.log(lam + 1e-3).sum(), rtol=1e-6)
    _close(effective_dimension(quad=quad, z=1e-3).value, (lam / (lam + 1e-3)).sum(), rtol=1e-6)
    with pytest.raises(ValueError, match="eigenvalues"):
        dual.exact_quadrature(torch.ones(F.shape[0] + 1), F.shape[0])


def _block_eigenvalues(F, op, name, k):
    idx = torch.cat([torch.arange(op.offsets[i], op.offsets[i + 1])
                     for i in op.block_indices(name)])
    return torch.linalg.eigvalsh(F[idx][:, idx]).flip(0)[:k]


def test_analyze_from_the_gram_matches_the_dense_fisher_and_the_lanczos_path(case):
    model, X, y = case
    F = dense_ggn(model, X)
    lam = torch.linalg.eigvalsh(F).flip(0).clamp_min(0)
    kw = {"top_k": 3, "probes": 3, "slq_steps": 12, "tol": 1e-8, "dense_block_max": 8}
    gram = analyze(model, (X, y), "cross_entropy", spectrum="gram", **kw)
    lanczos = analyze(model, (X, y), "cross_entropy", spectrum="lanczos", **kw)
    assert gram["spectrum"]["method"].startswith("gram of the rows")
    assert gram["spectrum"]["rows"] == len(X) * 3
    assert lanczos["spectrum"]["method"].startswith("lanczos")
    for report in (gram, lanczos):
        _close(report["top_eigenvalues"], lam[:3], rtol=1e-8)
        assert max(report["top_residuals"]) <= 1e-8
    # exact: no probes, no error bar, the dense values
    _close(gram["logdet"]["value"], torch.log(lam + 1e-3).sum(), rtol=1e-9)
    assert gram["logdet"]["stderr"] == 0.0 and gram["density"]["exact"]
    _close(gram["effective_dimension"]["value"], (lam / (lam + 1e-3)).sum(), rtol=1e-9)
    assert abs(lanczos["logdet"]["value"] - gram["logdet"]["value"]) <= 3 * (
        lanczos["logdet"]["error"] + 1e-9)
    assert math.isclose(sum(gram["density"]["weights"][0]), 1.0, rel_tol=1e-12)
    # the overlaps with the approximations' eigenvectors: the same numbers by both paths
    for key in gram["approximations"]:
        assert abs(gram["approximations"][key]["top_k_overlap"]
                   - lanczos["approximations"][key]["top_k_overlap"]) < 1e-6
    op = ExactFisher(model, (X, y))
    methods = []
    for row in gram["layers"]:
        k = len(row["top_eigenvalues"])
        _close(row["top_eigenvalues"], _block_eigenvalues(F, op, row["name"], k), rtol=1e-8,
               atol=1e-12)
        assert max(row["top_residuals"]) <= 1e-7
        methods.append(row["eigen_method"])
    assert any(m.startswith("gram of the rows") for m in methods)


def test_auto_takes_the_gram_only_when_it_is_smaller(tiny_mlp):
    model, X, y = tiny_mlp  # 21 rows, 43 parameters
    report = analyze(model, (X, y), "cross_entropy", top_k=2, probes=2, slq_steps=6)
    assert report["spectrum"]["method"].startswith("gram")
    big = analyze(model, (torch.cat([X] * 3), torch.cat([y] * 3)), "cross_entropy", top_k=2,
                  probes=2, slq_steps=6)  # 63 rows > 43 parameters
    assert big["spectrum"]["method"].startswith("lanczos")
    nocache = analyze(model, (X, y), "cross_entropy", top_k=2, probes=2, slq_steps=6,
                      cache=False)
    assert nocache["spectrum"]["method"].startswith("lanczos")


def test_bad_spectrum_requests_are_refused_by_name(tiny_mlp):
    model, X, y = tiny_mlp
    with pytest.raises(ValueError, match="spectrum must be one of auto, gram, lanczos"):
        analyze(model, (X, y), "cross_entropy", spectrum="dual")
    with pytest.raises(ValueError, match="spectrum='gram' needs .* cache=True"):
        analyze(model, (X, y), "cross_entropy", spectrum="gram", cache=False)
    with pytest.raises(ValueError, match="cache_bytes"):
        analyze(model, (X, y), "cross_entropy", spectrum="gram", cache_bytes=10)


def test_plan_with_the_gram_counts_two_gram_matrices_and_no_slq_basis():
    P, n = 100_000_000, 10_000
    plan = plan_analysis(P, 4, 1 << 30, 16 * GB, top_k=10, gram_rows=n)
    assert plan.gram_rows == n and "Gram matrix" in plan.text()
    assert plan.stages["density"] < plan.stages["trace"]
    assert plan.stages["top_k"] >= (1 << 30) + 2 * n * n * 4
    # the top-k stage of Lanczos on F holds a basis of P-vectors: far more
    assert plan_analysis(P, 4, 1 << 30, 16 * GB, top_k=10).stages["top_k"] > plan.stages["top_k"]
    assert plan.as_dict()["gram_rows"] == n
