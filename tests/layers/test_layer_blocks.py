"""The Embedding and normalization helpers against dense float64 Fisher blocks
(``natgrad.fisher.dense``), and their damped solves against dense solves."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad.blocks.scale_shift import ScaleShiftBlock
from natgrad.factors import DiagonalFactor
from natgrad.fisher.dense import dense_ggn

f64 = torch.float64


def _step(model, x, y, **kw) -> natgrad.KFAC:
    opt = natgrad.KFAC(model, lr=1.0, kl_clip=None, momentum=0.0, **kw)
    out = model(x)
    loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    return opt


# ---------------------------------------------------------------- Embedding
class TokenNet(nn.Module):
    def __init__(self, vocab=9, d=4, classes=3, padding_idx=None):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=padding_idx)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)).mean(1))


def test_embedding_one_datum_one_position_is_exact():
    torch.manual_seed(0)
    model = TokenNet().double()
    ids, y = torch.tensor([[5]]), torch.tensor([1])
    F_ref = dense_ggn(model, ids, params=[model.emb.weight])  # (vocab·d)²: W row-major = vec(Wᵀ)
    frozen = [p.detach().clone() for p in model.parameters()]
    opt = _step(model, ids, y, fisher="exact")
    A, G = opt.factors["emb"]
    assert isinstance(A, DiagonalFactor)
    torch.testing.assert_close(torch.kron(A.to_dense(), G.to_dense()), F_ref,
                               rtol=1e-10, atol=1e-13)
    assert frozen  # (the weights moved; the factors were taken before the step)


def test_embedding_counts_and_padding():
    torch.manual_seed(1)
    model = TokenNet(padding_idx=0).double()
    ids = torch.tensor([[0, 3, 3, 2], [1, 0, 3, 0]])
    y = torch.tensor([0, 2])
    before = model.emb.weight.detach().clone()
    opt = _step(model, ids, y, fisher="mc")
    A, G = opt.factors["emb"]
    counts = torch.zeros(9, dtype=f64)
    for t in ids.flatten().tolist():
        if t != 0:
            counts[t] += 1
    torch.testing.assert_close(A.diag(), counts / 2)  # per sample: summed over positions
    assert torch.equal(model.emb.weight[0], before[0])  # the padding row does not move
    assert not torch.equal(model.emb.weight[3], before[3])


@pytest.mark.parametrize("factors", ["eigh", "projected", "cholesky"])
def test_embedding_solve_equals_dense(factors):
    torch.manual_seed(2)
    model = TokenNet(d=5).double()
    g = torch.Generator().manual_seed(3)
    ids, y = torch.randint(0, 9, (6, 3), generator=g), torch.randint(0, 3, (6,), generator=g)
    w0 = model.emb.weight.detach().clone()
    out = model(ids)
    grad = torch.autograd.grad(F.cross_entropy(out, y), model.emb.weight)[0]
    opt = _step(model, ids, y, factors=factors, inverse_every=1,
                factor_options={"rank": 2} if factors == "projected" else None)
    A, G = opt.factors["emb"]
    step = (w0 - model.emb.weight.detach()).T  # (d, vocab) = V's layout
    V = grad.T
    if factors == "cholesky":  # π-split damping
        expect = G.inv_matmul(V) / (A.diag() + A.damping)
    else:  # exact damping of diag(a) ⊗ G
        K = torch.kron(A.to_dense(), G.to_dense()) + 1e-2 * torch.eye(9 * 5, dtype=f64)
        expect = torch.linalg.solve(K, V.T.reshape(-1)).reshape(9, 5).T
    torch.testing.assert_close(step, expect, rtol=1e-8, atol=1e-11)


# ---------------------------------------------------------------- normalization layers
def _norm_net(kind: str) -> nn.Module:
    torch.manual_seed(4)
    if kind == "layernorm":
        body = [nn.Linear(5, 6), nn.LayerNorm(6)]
    elif kind == "batchnorm":
        body = [nn.Linear(5, 6), nn.BatchNorm1d(6)]
    else:
        body = [nn.Linear(5, 6), nn.Unflatten(1, (6, 1)), nn.GroupNorm(3, 6), nn.Flatten()]
    model = nn.Sequential(*body, nn.Tanh(), nn.Linear(6, 3)).double()
    norm = next(m for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.BatchNorm1d,
                                                             nn.GroupNorm)))
    with torch.no_grad():  # a non-trivial affine pair and running statistics
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
        if isinstance(norm, nn.BatchNorm1d):
            norm.running_mean.uniform_(-0.3, 0.3)
            norm.running_var.uniform_(0.5, 2.0)
    return model, norm


@pytest.mark.parametrize("kind", ["layernorm", "batchnorm", "groupnorm"])
def test_norm_block_is_the_exact_per_channel_fisher_block(kind):
    from natgrad.fisher import KFACOperator

    model, norm = _norm_net(kind)
    model.eval()  # BatchNorm: running statistics, samples independent
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(7, 5, generator=g, dtype=f64), torch.randint(0, 3, (7,), generator=g)
    F_ref = dense_ggn(model, x, params=[norm.weight, norm.bias])  # [γ; β] layout
    name = next(n for n, m in model.named_modules() if m is norm)
    K = KFACOperator.from_data(model, (x, y), fisher="exact")
    (M,) = K.factors[name]
    assert isinstance(K.blocks[name], ScaleShiftBlock)
    C = 6
    mask = torch.zeros(2 * C, 2 * C, dtype=torch.bool)
    idx = torch.arange(C)
    for i in range(2):
        for j in range(2):
            mask[i * C + idx, j * C + idx] = True
    torch.testing.assert_close(M.to_dense(), F_ref * mask, rtol=1e-10, atol=1e-13)
    if kind != "batchnorm":  # train mode is deterministic: the optimizer's capture agrees
        model.train()
        opt = _step(model, x, y, fisher="exact")
        torch.testing.assert_close(opt.factors[name][0].to_dense(), M.to_dense(),
                                   rtol=1e-10, atol=1e-13)


def test_norm_solve_is_the_per_channel_damped_solve():
    model, norm = _norm_net("layernorm")
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(8, 5, generator=g, dtype=f64), torch.randint(0, 3, (8,), generator=g)
    w0, b0 = norm.weight.detach().clone(), norm.bias.detach().clone()
    gw, gb = torch.autograd.grad(F.cross_entropy(model(x), y), [norm.weight, norm.bias])
    opt = _step(model, x, y, inverse_every=1, damping=1e-2)
    (M,) = opt.factors["1"]
    step = torch.cat([w0 - norm.weight.detach(), b0 - norm.bias.detach()])
    expect = torch.linalg.solve(M.to_dense() + 1e-2 * torch.eye(12, dtype=f64),
                                torch.cat([gw, gb]))
    torch.testing.assert_close(step, expect, rtol=1e-9, atol=1e-12)


def test_norm_blocks_solved_together_equal_dense_solves():
    """``ScaleShiftBlock.solve_many`` stacks the channels of equal-width blocks (different ``C``
    and dampings here) into one solve; each direction and ``⟨V, D⟩`` equal the dense damped
    solve of its own block, and a lone width-1 block is solved on its own."""
    from natgrad.blocks.scale_shift import ScaleShiftFactor

    g = torch.Generator().manual_seed(9)
    requests, dense = [], []
    for C, width, lam in [(3, 2, 0.1), (5, 2, 1e-3), (4, 1, 0.2), (2, 2, 0.5)]:
        f = ScaleShiftFactor(width * C, width=width, dtype=f64)
        R = torch.randn(C, width, width, generator=g, dtype=f64)
        f.M = R @ R.mT
        block = ScaleShiftBlock(f)
        V = torch.randn(width * C, generator=g, dtype=f64)
        blocks = [c.reshape(C, 1) for c in V.split(C)]
        requests.append((block, blocks, lam, None))
        dense.append((V, torch.linalg.solve(f.to_dense() + lam * torch.eye(width * C, dtype=f64),
                                            V)))
    out = ScaleShiftBlock.solve_many(requests)
    for D, (V, expect) in zip(out, dense):
        torch.testing.assert_close(D.dense().T.reshape(-1), expect, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(D.inner, V @ expect, rtol=1e-10, atol=1e-13)


def test_train_mode_batchnorm_cnn_trains():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    opt = natgrad.KFAC(model, lr=0.05)
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(16, 1, 6, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert set(opt.layers) == {"0", "1", "4"}
    assert losses[-1] < 0.7 * losses[0]
    assert "1 [norm] scale_shift(C=4, 2x2 each)" in opt.registration_summary
