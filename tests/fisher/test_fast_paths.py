"""The fast paths behind ``natgrad analyze``: linearised / cached / budget-limited products,
per-sample-row Gram blocks, per-layer traces from the layer helpers, Lanczos runs reused as SLQ
probes, block products whose sum is ``F V`` — each against a dense reference."""

import pytest
import torch

from natgrad.fisher import ExactFisher, MCFisher, lanczos_topk, quadrature
from natgrad.fisher.dense import dense_ggn
from natgrad.fisher.kfac import layer_traces
from natgrad.fisher.lanczos import tridiagonalize
from natgrad.fisher.quality import block_products
from natgrad.fisher.slq import slq_logdet
from natgrad.layers import helper_for

RTOL = 1e-6


def close(a, b, rtol=RTOL):
    scale = b.abs().max().clamp_min(1e-12)
    assert float((a - b).abs().max() / scale) < rtol


@pytest.mark.parametrize("name", ["tiny_mlp", "tiny_cnn"])
def test_cached_linearized_products_within_budget(name, request):
    model, X, y = request.getfixturevalue(name)
    F = dense_ggn(model, X)
    V = torch.randn(F.shape[0], 4, dtype=torch.float64)
    plain = ExactFisher(model, (X, y), chunk_size=2)  # >= 3 columns: linearised per chunk
    close(plain @ V, F @ V)
    close(plain @ V[:, 0], F @ V[:, 0])  # one column: plain jvp
    full = ExactFisher(model, (X, y), chunk_size=2, cache=True, cache_bytes=None)
    for _ in range(2):
        close(full @ V, F @ V)
    assert full._cache_state == "all" and len(full._cache) == 3 + (X.shape[0] > 6)
    one = full._cache[0].nbytes
    part = ExactFisher(model, (X, y), chunk_size=2, cache=True, cache_bytes=1)
    for _ in range(2):  # nothing fits: every chunk recomputed
        close(part @ V, F @ V)
    assert part._cache_state == "full" and not part._cache
    some = ExactFisher(model, (X, y), chunk_size=2, cache=True, cache_bytes=1 << 30)
    for _ in range(2):
        close(some @ V, F @ V)
    assert some._cache[0].nbytes > 0 or one == 0
    some.clear_cache()
    assert not some._cache and some._cache_state == "open"
    close(some @ V, F @ V)


def test_mc_fisher_cached_is_the_same_matrix(tiny_mlp):
    model, X, y = tiny_mlp
    ref = MCFisher(model, (X, y), mc_samples=2, seed=3, chunk_size=3).to_dense()
    op = MCFisher(model, (X, y), mc_samples=2, seed=3, chunk_size=3, cache=True)
    V = torch.randn(op.dim, 3, dtype=torch.float64)
    close(op @ V, ref @ V)
    close(op @ V, ref @ V)


def test_gram_and_restrict(tiny_cnn):
    model, X, y = tiny_cnn
    op = ExactFisher(model, (X, y), chunk_size=2)
    F = op.to_dense()
    close(op.gram(memory_elements=50), F)  # tiny sub-chunks
    blk = op.restrict(["4.weight", "0.bias"])  # flat order is the operator's
    assert blk.names == ["0.bias", "4.weight"]
    idx = torch.cat([torch.arange(op.offsets[1], op.offsets[2]),
                     torch.arange(op.offsets[2], op.offsets[3])])
    close(blk.gram(), F[idx][:, idx])
    close(blk.to_dense(), F[idx][:, idx])
    with pytest.raises(ValueError):
        op.restrict(["nope"])


@pytest.mark.parametrize("name", ["tiny_mlp", "tiny_cnn"])
def test_layer_traces_equal_exact_diagonal(name, request):
    model, X, y = request.getfixturevalue(name)
    op = ExactFisher(model, (X, y), chunk_size=3)
    d = op.diagonal()
    layers = {n: h for n, m in model.named_modules() for h in [helper_for(m)[0]] if h}
    for mem in (1 << 24, 7):  # Gram and direct per-sample forms, tiny sub-chunks
        tr = layer_traces(op, layers, memory_elements=mem)
        for n in layers:
            ref = sum(float(d[op.offsets[i]:op.offsets[i + 1]].sum())
                      for i in op.block_indices(n))
            assert tr[n] == pytest.approx(ref, rel=RTOL)


def test_topk_run_reused_as_slq_probe():
    torch.manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(60, 60, dtype=torch.float64))
    M = Q @ torch.diag(0.8 ** torch.arange(60, dtype=torch.float64)) @ Q.T

    class Dense(ExactFisher.__mro__[2]):  # LinearOperator
        def __init__(self):
            super().__init__(["w"], [torch.Size([60])], torch.float64)

        def _matmat(self, V):
            return M @ V

    op = Dense()
    top = lanczos_topk(op, k=3, seed=1, min_steps=25)
    assert top.alpha.numel() >= 25 and top.converged
    q = quadrature(op, probes=3, steps=20, seed=2, runs=[(top.alpha, top.beta)])
    assert q.nodes.shape == (3, 20)
    # the reused probe equals a fresh run from the same start vector
    v0 = torch.randn(60, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a, b, _ = tridiagonalize(op, v0[:, None], 20)
    ref = quadrature(op, probes=1, steps=20, runs=[(a[0], b[0])])
    close(q.nodes[0], ref.nodes[0], 1e-8)
    close(q.weights[0], ref.weights[0], 1e-8)
    short = quadrature(op, probes=2, steps=20, seed=2, runs=[(a[0, :5], b[0, :4])])
    assert short.weights[0, 5:].abs().max() == 0 and short.nodes.shape == (2, 20)
    exact = float(torch.logdet(M + 1e-3 * torch.eye(60, dtype=torch.float64)))
    est = slq_logdet(quad=quadrature(op, probes=30, steps=30, seed=4, runs=[(top.alpha,
                                                                            top.beta)]))
    assert abs(est.value - exact) < 4 * est.stderr + 1e-6


def test_block_products_sum_is_full_product(tiny_cnn):
    model, X, y = tiny_cnn
    op = ExactFisher(model, (X, y))
    F = op.to_dense()
    cases = [([[0, 1], [2, 3]], True), ([[0, 1]], True), ([[0, 1, 2], [2, 3]], False)]
    for groups, disjoint in cases:  # covering, partial, overlapping
        bp = block_products(op, groups, probes=3, seed=1)
        close(bp.FV, F @ bp.V)
        for g in groups if disjoint else []:
            m = torch.zeros(op.dim, dtype=torch.bool)
            for i in g:
                m[op.offsets[i]:op.offsets[i + 1]] = True
            close(bp.DV[m], (F[m][:, m] @ bp.V[m]))
