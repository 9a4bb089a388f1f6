"""The memory-bounded estimators against dense float64 references: thick-restart Lanczos with a
bounded basis, SLQ without a kept basis. Memory is counted structurally: the vectors of ``P``
alive (distinct tensor storages, via the garbage collector's list of tensors) at every product."""

import gc

import pytest
import torch
from torch import nn

from natgrad.fisher import ExactFisher, LinearOperator, lanczos_topk, quadrature, slq_logdet
from natgrad.fisher.dense import dense_ggn


class Dense(LinearOperator):
    def __init__(self, M):
        super().__init__(["w"], [M.shape[:1]], M.dtype)
        self.M = M

    def _matmat(self, V):
        return self.M @ V


class Census(Dense):
    """``M`` as an operator that records, at each product, how many vectors of ``P`` are alive
    that were not before it was made: the bytes of the distinct tensor storages of a multiple
    of ``P`` elements over ``P · 8`` (``P`` prime: small matrices do not count)."""

    def __init__(self, M):
        super().__init__(M)
        self.live: list[float] = []
        self.before = {st.data_ptr() for st in self._storages()}

    def _storages(self):
        for o in gc.get_objects():
            if issubclass(type(o), torch.Tensor) and o.numel() >= self.dim:
                yield o.untyped_storage()

    def _matmat(self, V):
        seen, total = set(self.before), 0
        for st in self._storages():
            if st.data_ptr() not in seen and st.nbytes() % (4 * self.dim) == 0:
                seen.add(st.data_ptr())
                total += st.nbytes()
        self.live.append(total / (self.dim * 8))
        return super()._matmat(V)


def clustered_psd(n=307, seed=0):
    """A PSD matrix whose top eigenvalues come in tight clusters (gaps of 1e-4 relative)."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    top = torch.tensor([10, 9.999, 9.998, 9.99, 5, 5.0005, 4.9995, 4.99, 4.98, 4.97, 4.5, 4.4],
                       dtype=torch.float64)
    lam = torch.cat([top, 4 * torch.rand(n - len(top), generator=gen, dtype=torch.float64)])
    lam = lam.sort(descending=True).values
    return Q @ torch.diag(lam) @ Q.T, lam, Q


@pytest.mark.parametrize("max_basis", [14, 28])
def test_restarted_lanczos_matches_eigh_on_a_clustered_spectrum(max_basis):
    M, lam, Q = clustered_psd()
    res = lanczos_topk(Dense(M), k=10, tol=1e-8, max_steps=3000, max_basis=max_basis)
    assert res.converged and float(res.residuals.max()) <= 1e-8
    assert float((res.values - lam[:10]).abs().max() / lam[0]) < 1e-12
    ref, vec = torch.linalg.eigh(M)
    V = vec.flip(1)[:, :10]  # the clusters are resolved: each vector matches up to sign
    assert float((V.T @ res.vectors).abs().diagonal().min()) > 1 - 1e-6
    assert res.steps - 10 > max_basis  # it did restart


def test_restarted_lanczos_holds_a_bounded_basis(max_basis=14):
    M, _, _ = clustered_psd()
    op = Census(M)
    res = lanczos_topk(op, k=10, tol=1e-12, max_steps=2 * max_basis + 5, max_basis=max_basis)
    assert res.steps == 2 * max_basis + 5 + 10  # two restarts, then the residuals
    # the basis (≤ max_basis + 1 vectors, 2k while the Ritz vectors are copied out), no more
    assert max(op.live) <= max(max_basis + 1, 20)
    assert max(op.live) >= max_basis  # the census sees the basis


def test_restarted_lanczos_matches_the_dense_fisher_of_a_tiny_model():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    X, y = torch.randn(20, 6, dtype=torch.float64), torch.randint(0, 4, (20,))
    F = dense_ggn(model, X)
    ref = torch.linalg.eigvalsh(F).flip(0)[:5]
    op = ExactFisher(model, (X, y))
    res = lanczos_topk(op, k=5, tol=1e-10, max_steps=400, max_basis=12)
    assert res.converged and float(res.residuals.max()) <= 1e-10
    assert float((res.values - ref).abs().max() / ref[0]) < 1e-10
    R = F @ res.vectors - res.vectors * res.values
    assert float((R.norm(dim=0) / res.values).max()) < 1e-8  # against the dense matrix


def test_restarted_lanczos_keeps_the_first_cycle_as_a_probe():
    M, _, _ = clustered_psd(n=127, seed=2)
    op = Census(M)
    res = lanczos_topk(op, k=4, tol=1e-8, max_basis=12, min_steps=20, seed=5, max_steps=25)
    plain = lanczos_topk(Dense(M), k=4, tol=1e-8, min_steps=20, seed=5)
    assert res.alpha.numel() == 20 and res.beta.numel() == 19
    assert torch.allclose(res.alpha, plain.alpha[:20], rtol=1e-10)
    assert torch.allclose(res.beta, plain.beta[:19], rtol=1e-10)
    assert max(op.live) <= 20 + 1


def test_restarted_lanczos_refuses_a_basis_too_small():
    M, _, _ = clustered_psd(n=53)
    with pytest.raises(ValueError, match="max_basis"):
        lanczos_topk(Dense(M), k=10, max_basis=11)


def random_psd(n=307, seed=0, decay=0.9):
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    lam = 10.0 * decay ** torch.arange(n, dtype=torch.float64) + 1e-3
    return Q @ torch.diag(lam) @ Q.T, lam


def test_streamed_slq_agrees_with_the_exact_log_det_and_the_reorthogonalised_runs():
    """Without reorthogonalisation the fast decay makes the recurrence lose orthogonality
    (ghost nodes) within 40 steps; the quadrature still gives log det within its error bar,
    and the value of the reorthogonalised runs from the same probes to a small fraction of
    that bar (measured: 0.83 against a bar of 49, 5e-4 relative)."""
    M, lam = random_psd()
    truth = float(torch.log(lam + 1e-3).sum())
    streamed = quadrature(Dense(M), probes=16, steps=40, seed=0, reorthogonalize=False)
    full = quadrature(Dense(M), probes=16, steps=40, seed=0)
    ghosts = (streamed.nodes[:, None, :] - streamed.nodes[:, :, None]).abs() < 1e-8 * lam[0]
    assert int(ghosts.sum()) > streamed.nodes.numel()  # repeated nodes exist
    est = slq_logdet(quad=streamed, damping=1e-3)
    ref = slq_logdet(quad=full, damping=1e-3)
    assert abs(est.value - truth) < 3 * est.error
    assert abs(est.value - ref.value) < 0.05 * ref.error
    assert abs(est.error - ref.error) < 0.1 * ref.error
    assert torch.allclose(streamed.weights.sum(1), torch.ones(16, dtype=torch.float64))


def test_streamed_slq_keeps_three_vectors_per_run():
    M, _ = random_psd()
    op = Census(M)
    quadrature(op, probes=3, steps=30, seed=1, reorthogonalize=False, batch=1)
    assert len(op.live) == 90 and max(op.live) <= 3  # q_{j-1}, q_j and w, whatever the steps
    kept = Census(M)
    quadrature(kept, probes=1, steps=30, seed=1)  # the reorthogonalised run holds its basis
    assert max(kept.live) >= 29
