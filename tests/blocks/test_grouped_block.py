"""The grouped-convolution block's batched refresh and solve (one ``(g, ·, ·)`` product for all
groups) against the per-group loop and the dense damped inverse of ``blockdiag_j(A_j ⊗ G_j)``,
float64."""

from __future__ import annotations

import pytest
import torch

from natgrad.blocks.base import LayerStatistics
from natgrad.blocks.grouped import GroupedKroneckerBlock
from natgrad.factors import EighFactor, make_factor, solve, update_factors

F64 = {"dtype": torch.float64}


def _block(strategy: str, d_a: int, d_g: int, groups: int, seed: int = 0, **opts
           ) -> GroupedKroneckerBlock:
    kw = {**F64, **({"options": opts} if opts else {})}
    blk = GroupedKroneckerBlock([make_factor(strategy, d_a, **kw) for _ in range(groups)],
                                [make_factor(strategy, d_g, **kw) for _ in range(groups)])
    _feed(blk, seed)
    return blk


def _feed(blk: GroupedKroneckerBlock, seed: int, steps: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    g, d_a, d_g = blk.groups, blk.A[0].dim, blk.G[0].dim
    for _ in range(steps):
        a = torch.randn(120, g * d_a, generator=gen, **F64)
        grad = torch.randn(120, g * d_g, generator=gen, **F64)
        update_factors(blk.stage(LayerStatistics(a, 1 / 120, grad, 1 / 120, 120), 0.8), 0.8)


def _dense_solve(blk: GroupedKroneckerBlock, V: torch.Tensor, damping: float) -> torch.Tensor:
    """``(blockdiag_j(A_j ⊗ G_j) + λ I)⁻¹ vec(V)`` with the factors as represented."""
    d_g = blk.G[0].dim
    out = []
    for j, (A, G) in enumerate(zip(blk.A, blk.G)):
        B = torch.kron(A.to_dense() if A.name == "eigh" else _represented(A),
                       G.to_dense() if G.name == "eigh" else _represented(G))
        v = V[j * d_g:(j + 1) * d_g].T.reshape(-1)  # column-stacking vec
        x = torch.linalg.solve(B + damping * torch.eye(len(v), **F64), v)
        out.append(x.reshape(V.shape[1], d_g).T)
    return torch.cat(out)


def _represented(f) -> torch.Tensor:
    U, lam, sig = f.eigen()
    return (U * lam) @ U.T + sig * (torch.eye(f.dim, **F64) - U @ U.T)


# (strategy, d_A, d_G, groups, options): depthwise 3×3 (+ bias) and 7×7 (+ bias, projected A of
# rank 8 < d_A), a grouped conv with 3 output channels per group; the last has a low-rank G and
# takes the per-group loop
CASES = [("eigh", 10, 1, 6, {}), ("projected", 10, 1, 6, {}),
         ("projected", 50, 1, 5, {"rank": 8}), ("eigh", 7, 3, 4, {}),
         ("projected", 12, 12, 3, {"rank": 4})]


@pytest.mark.parametrize("strategy,d_a,d_g,groups,opts", CASES)
def test_batched_solve_is_the_damped_inverse(strategy, d_a, d_g, groups, opts):
    blk = _block(strategy, d_a, d_g, groups, **opts)
    blk.refresh(1e-2)
    V = torch.randn(groups * d_g, d_a, generator=torch.Generator().manual_seed(3), **F64)
    got = blk.solve([V[:, :-1], V[:, -1:]], 1e-2)
    assert (blk._stacked() is not None) == (d_g < 12)  # the batched path where it applies
    loop = torch.cat([solve([V[j * d_g:(j + 1) * d_g]], A, G, 1e-2).dense()
                      for j, (A, G) in enumerate(zip(blk.A, blk.G))])
    torch.testing.assert_close(got.dense(), loop, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got.dense(), _dense_solve(blk, V, 1e-2), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.inner, (V * got.dense()).sum(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("strategy,opts", [("eigh", {}), ("projected", {"rank": 8})])
def test_stack_follows_new_statistics_and_refreshes(strategy, opts):
    """A factor update or refresh after a solve is seen by the next solve (no stale stack)."""
    blk = _block(strategy, 50, 1, 4, **opts)
    blk.refresh(1e-2)
    V = torch.randn(4, 50, generator=torch.Generator().manual_seed(4), **F64)
    first = blk.solve([V], 1e-2).dense()
    _feed(blk, seed=9, steps=1)  # projected factors change at the update, eigh at the refresh
    blk.refresh(1e-2)
    again = blk.solve([V], 1e-2).dense()
    assert not torch.allclose(first, again)
    torch.testing.assert_close(again, _dense_solve(blk, V, 1e-2), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(blk.solve([V], 0.5).dense(), _dense_solve(blk, V, 0.5),
                               rtol=1e-10, atol=1e-12)


def test_batched_eigh_refresh_equals_one_by_one():
    blk = _block("eigh", 10, 1, 5)
    ref = [EighFactor(10, **F64) for _ in range(5)]
    for f, r in zip(blk.A, ref):
        r.load_state_dict(f.state_dict())
    dampings = [0.1 * (i + 1) for i in range(5)]
    EighFactor.refresh_batch(list(blk.A), dampings)
    for f, r, d in zip(blk.A, ref, dampings):
        r.refresh(d)
        assert f.refreshed and f.damping == d
        torch.testing.assert_close(f.lam, r.lam, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(f.Q @ torch.diag(f.lam) @ f.Q.T, f.F, rtol=1e-12, atol=1e-13)


def test_batched_eigh_refresh_falls_back_on_a_bad_factor():
    """A non-finite moment in one group: the others refresh, that one raises as ``refresh``
    does, and keeps its previous decomposition."""
    from natgrad.factors import FactorRefreshError

    fs = [EighFactor(3, **F64) for _ in range(3)]
    for f in fs:
        f.update(torch.randn(8, 3, **F64), 1 / 8, 0.9)
    fs[1].F = fs[1].F.clone()
    fs[1].F[0, 0] = float("nan")
    Q_before = fs[1].Q.clone()
    with pytest.raises(FactorRefreshError):
        EighFactor.refresh_batch(fs, [0.1, 0.1, 0.1])
    assert fs[0].refreshed and not fs[1].refreshed
    torch.testing.assert_close(fs[1].Q, Q_before)
