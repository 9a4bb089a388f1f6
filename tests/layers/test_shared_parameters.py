"""Shared parameters (docs/DESIGN.md, "Shared parameters"): a tensor used by several layers has
one block, its first use's, which preconditions the gradient summed over all its uses; the
registration says so per parameter, and nothing is registered twice."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import natgrad

f64 = torch.float64


class TiedLM(nn.Module):
    """Embedding and output head sharing one ``(vocab, d)`` tensor, as GPT-2's wte / lm_head."""

    def __init__(self, vocab: int = 7, d: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.emb(ids))))


def test_tied_weights_one_block_and_the_rule_stated():
    model = TiedLM()
    opt = natgrad.KFAC(model)
    assert set(opt.layers) == {"emb", "mix"}  # no second block for the head
    reg = opt.curvature.registration
    assert reg.shared_uses == {"head": "emb"} and "'emb'" in reg.skipped["head"]
    assert "shared use      head" in opt.registration_summary
    assert list(reg.shared) == ["emb.weight"]
    assert "'emb', 'head'" in reg.shared["emb.weight"]
    assert "summed over all uses" in opt.registration_summary
    assert "emb.weight" not in reg.plain
    assert reg.coverage(model) == 1.0


def test_tied_weights_update_is_the_first_uses_block_on_the_summed_gradient():
    torch.manual_seed(0)
    model = TiedLM().double()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 7, (5, 3), generator=g)
    y = torch.randint(0, 7, (5, 3), generator=g)
    w0 = model.emb.weight.detach().clone()

    def loss_fn():
        return F.cross_entropy(model(ids).reshape(-1, 7), y.reshape(-1))

    total = torch.autograd.grad(loss_fn(), model.emb.weight)[0]
    head_detached = F.linear(torch.tanh(model.mix(model.emb(ids))), model.emb.weight.detach())
    emb_only = torch.autograd.grad(F.cross_entropy(head_detached.reshape(-1, 7), y.reshape(-1)),
                                   model.emb.weight)[0]
    opt = natgrad.KFAC(model, lr=1.0, kl_clip=None, inverse_every=1, damping=1e-2)
    loss = loss_fn()
    opt.zero_grad()
    loss.backward()
    torch.testing.assert_close(model.emb.weight.grad, total)  # autograd sums both uses
    opt.step()
    A, G = opt.factors["emb"]
    K = torch.kron(A.to_dense(), G.to_dense()) + 1e-2 * torch.eye(7 * 4, dtype=f64)
    V = total.T  # the embedding's layout (d, vocab)
    expect = torch.linalg.solve(K, V.T.reshape(-1)).reshape(7, 4)  # back to (vocab, d)
    step = w0 - model.emb.weight.detach()
    torch.testing.assert_close(step, expect, rtol=1e-8, atol=1e-11)
    one_use = torch.linalg.solve(K, emb_only.reshape(-1)).reshape(7, 4)
    assert not torch.allclose(step, one_use, rtol=1e-3)  # the head's gradient is in the step
