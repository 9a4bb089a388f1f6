"""Every layer type of the case table (:mod:`_layer_cases`) against its dense float64 Fisher
block (``natgrad.fisher.dense``): the analysis' K-FAC operator and the optimizer's capture give
the exact block where K-FAC is exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _layer_cases import CASES, Case
from torch import nn

import natgrad
from natgrad.fisher import KFACOperator
from natgrad.fisher.dense import dense_ggn


def _layer_name(model: nn.Module, layer: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is layer)


def _sub(K: KFACOperator, prefix: str) -> torch.Tensor:
    """The dense operator restricted to the parameters of layer ``prefix`` (their own order)."""
    idx = torch.cat([torch.arange(K.offsets[i], K.offsets[i + 1])
                     for i, n in enumerate(K.names) if n.rsplit(".", 1)[0] == prefix])
    return K.to_dense()[idx][:, idx]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_block_is_the_exact_fisher_block(case: Case):
    case.skip_without_needs()
    model, layer = case.build()
    name = _layer_name(model, layer)
    x = case.x()
    y = torch.randint(0, 3, (x.shape[0],), generator=torch.Generator().manual_seed(15))
    model.eval()
    F_ref = dense_ggn(model, x, params=list(layer.parameters()))
    K = KFACOperator.from_data(model, (x, y), fisher="exact")
    assert K.layers[name].kind == case.kind
    expect = F_ref * case.mask(layer)
    torch.testing.assert_close(_sub(K, name), expect, rtol=case.rtol, atol=case.rtol * 1e-2)
    if "batchnorm" in case.name:
        return  # train mode uses batch statistics: another function of the parameters
    model.train()
    opt = natgrad.KFAC(model, lr=1e-3, fisher="exact", kl_clip=None)
    out = model(x)
    opt.zero_grad()
    F.cross_entropy(out, y).backward()
    opt.step()
    assert name in opt.layers
    torch.testing.assert_close(_sub(KFACOperator.from_optimizer(opt), name), expect,
                               rtol=case.rtol, atol=case.rtol * 1e-2)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_analysis_runs_on_each_layer_type(case: Case):
    """``analyze()`` end to end: its exact trace is the dense Fisher's; the per-sample paths
    (``cache=False``) agree where the layer has them."""
    from natgrad.fisher.analysis import analyze

    case.skip_without_needs()
    model, layer = case.build()
    model.eval()
    g = torch.Generator().manual_seed(16)
    x = torch.randn((4, *case.x().shape[1:]), generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (4,), generator=g)
    expect = float(torch.trace(dense_ggn(model, x)))
    caches = (True, False) if case.kind != "norm" else (True,)
    for cache in caches:
        report = analyze(model, (x, y), "cross_entropy", top_k=2, density=False, cache=cache)
        assert report["trace"]["value"] == pytest.approx(expect, rel=case.rtol * 10)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_step_is_the_damped_solve_of_the_block(case: Case):
    """The optimizer's step on the layer is ``(B + λ I)⁻¹ ∇`` for its block ``B`` as the
    operator represents it (eigh factors: exact damping; per-channel blocks: exact)."""
    case.skip_without_needs()
    model, layer = case.build()
    name = _layer_name(model, layer)
    x = case.x()
    y = torch.randint(0, 3, (x.shape[0],), generator=torch.Generator().manual_seed(17))
    params = list(layer.parameters())
    before = [p.detach().clone() for p in params]
    opt = natgrad.KFAC(model, lr=1.0, kl_clip=None, inverse_every=1, damping=0.1)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    grad = torch.cat([p.grad.reshape(-1) for p in params])
    opt.step()
    B = _sub(KFACOperator.from_optimizer(opt), name)
    expect = torch.linalg.solve(B + 0.1 * torch.eye(len(grad), dtype=grad.dtype), grad)
    step = torch.cat([(b - p.detach()).reshape(-1) for b, p in zip(before, params)])
    torch.testing.assert_close(step, expect, rtol=1e-8, atol=1e-11)
