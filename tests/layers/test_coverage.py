"""How much of the networks users bring is preconditioned (by parameter count), and that they
train: a tiny transformers GPT-2 (Conv1D projections, tied embeddings) and a MobileNet-style net
(depthwise-separable and inverted-residual blocks, BN + activation, squeeze-excitation)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _layer_cases import BatchNormAct2d, mobilenet_like, randomize_norm, tiny_gpt2

import natgrad
from natgrad.curvature import discover
from natgrad.fisher import KFACOperator
from natgrad.fisher.dense import dense_ggn


def test_gpt2_is_at_least_95_percent_preconditioned():
    pytest.importorskip("transformers")
    model = tiny_gpt2()
    reg = discover(model)
    assert reg.coverage(model) >= 0.95
    kinds = {h.kind for h in reg.layers.values()}
    assert {"linear_transposed", "embedding", "norm"} <= kinds
    assert "transformer.wte.weight" in reg.shared


def test_mobilenet_like_is_at_least_90_percent_preconditioned():
    model = mobilenet_like()
    reg = discover(model)
    assert reg.coverage(model) >= 0.90
    assert sum(h.kind == "conv2d_grouped" for h in reg.layers.values()) == 3


@pytest.mark.parametrize("factors", ["eigh", "projected"])
def test_gpt2_trains(factors):
    pytest.importorskip("transformers")
    model = tiny_gpt2()
    opt = natgrad.KFAC(model, lr=0.1, factors=factors, inverse_every=1)
    ids = torch.randint(0, 50, (8, 12), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(4):
        logits = model(ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(b.refreshed for b in opt.curvature.blocks.values())
    assert opt.curvature.registration.coverage(model) >= 0.95  # nothing dropped on the way


@pytest.mark.parametrize("factors", ["eigh", "projected"])
def test_mobilenet_like_trains_and_keeps_its_blocks(factors):
    torch.manual_seed(2)
    model = mobilenet_like()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 5, (16,), generator=g)
    opt = natgrad.KFAC(model, lr=0.1, factors=factors, inverse_every=1)
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert opt.curvature.registration.coverage(model) >= 0.90
    assert "pre-activation gradient" in opt.registration_summary


def test_mobilenet_like_analysis_norm_blocks_are_exact():
    """The analysis' K-FAC operator on the whole net: every BN + activation block (eval mode) is
    the exact per-channel block of the dense Fisher, with in-place activations and residuals."""
    torch.manual_seed(4)
    model = mobilenet_like(classes=3, c=4).double()
    for m in model.modules():
        if isinstance(m, BatchNormAct2d):
            randomize_norm(m, seed=len(m.weight))
    model.eval()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (2,), generator=g)
    K = KFACOperator.from_data(model, (x, y), fisher="exact")
    assert not K.uncovered
    norms = {n: m for n, m in model.named_modules() if isinstance(m, BatchNormAct2d)}
    assert len(norms) == 10
    F_ref = dense_ggn(model, x, params=[p for m in norms.values() for p in m.parameters()])
    start = 0
    for name, m in norms.items():
        C = m.weight.numel()
        cols = slice(start, start + 2 * C)
        start += 2 * C
        c = torch.arange(C).repeat(2)
        (M,) = K.factors[name]
        torch.testing.assert_close(M.to_dense(), F_ref[cols, cols] * (c[:, None] == c[None]),
                                   rtol=1e-9, atol=1e-12, msg=name)
