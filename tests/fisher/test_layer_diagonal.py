"""The pulled-back (layer-wise) exact diagonal and traces against the dense float64 reference."""

import pytest
import torch
from torch import nn

from natgrad.fisher import EmpiricalFisher, ExactFisher, MCFisher, exact_trace
from natgrad.fisher.dense import dense_ggn
from natgrad.fisher.kfac import layer_traces
from natgrad.fisher.layer_diagonal import (
    per_sample_sq_norms,
    per_sample_sq_sum,
    recognised_layers,
)
from natgrad.fisher.pullback import pullback, pullback_rows
from natgrad.layers import helper_for

RTOL = 1e-10  # float64 throughout: the formulas are exact


def rel(a, b):
    return float((a - b).norm() / b.norm())


def _targets(loss, n, c=3):
    if loss == "cross_entropy":
        return torch.randint(0, c, (n,))
    if loss == "bce":
        return torch.randint(0, 2, (n, c)).double()
    return torch.randn(n, c, dtype=torch.float64)


def _models():
    torch.manual_seed(0)
    return {
        "linear_bias": (nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)),
                        torch.randn(7, 4)),
        "linear_no_bias": (nn.Sequential(nn.Linear(4, 5, bias=False), nn.ReLU(),
                                         nn.Linear(5, 3, bias=False)), torch.randn(7, 4)),
        "conv_stride_pad": (nn.Sequential(
            nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(3, 2, 2, bias=False), nn.Flatten(), nn.Linear(8, 3)),
            torch.randn(5, 2, 6, 6)),
        "cnn_pool_same": (nn.Sequential(
            nn.Conv2d(1, 2, 3, padding="same"), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(2 * 3 * 3, 3)), torch.randn(5, 1, 6, 6)),
    }


@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "bce"])
@pytest.mark.parametrize("name", list(_models()))
def test_diagonal_matches_dense(name, loss):
    model, X = _models()[name]
    model, X = model.double(), X.double()
    y = _targets(loss, X.shape[0])
    op = ExactFisher(model, (X, y), loss, chunk_size=3)
    D = dense_ggn(model, X, loss).diagonal()
    assert rel(op.diagonal(), D) < RTOL
    assert rel(op.sample_diagonal(), D) < RTOL  # the generic path agrees too
    assert exact_trace(op).value == pytest.approx(float(D.sum()), rel=RTOL)
    layers = {n: h for n, m in model.named_modules() for h in [helper_for(m)[0]] if h}
    assert set(recognised_layers(op)) == set(layers)
    for mem in (1 << 24, 7):  # whole chunks and tiny sub-chunks
        tr = layer_traces(op, layers, memory_elements=mem)
        for n in layers:
            ref = sum(float(D[op.offsets[i]:op.offsets[i + 1]].sum())
                      for i in op.block_indices(n))
            assert tr[n] == pytest.approx(ref, rel=RTOL)


@pytest.mark.parametrize("cls", [MCFisher, EmpiricalFisher])
def test_diagonal_of_mc_and_empirical(cls):
    model, X = _models()["conv_stride_pad"]
    model, X = model.double(), X.double()
    y = _targets("cross_entropy", X.shape[0])
    op = cls(model, (X, y), chunk_size=2)
    assert rel(op.diagonal(), op.to_dense().diagonal()) < RTOL


class _Odd(nn.Module):
    """A Linear used twice (shared weights) and a parameter outside every layer."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 4)
        self.shared = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4))
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.shared(torch.tanh(self.shared(self.inp(x)))))
        return self.out(h * self.scale)


def test_generic_path_for_shared_and_foreign_parameters():
    torch.manual_seed(3)
    model, X = _Odd().double(), torch.randn(6, 4, dtype=torch.float64)
    y = _targets("cross_entropy", 6)
    op = ExactFisher(model, (X, y), chunk_size=4)
    assert set(recognised_layers(op)) == {"inp", "out"}  # "shared" runs twice
    D = dense_ggn(model, X).diagonal()
    assert rel(op.diagonal(), D) < RTOL
    sub = ExactFisher(model, (X, y), params=["out.weight", "inp"], chunk_size=4)
    assert set(recognised_layers(sub)) == {"inp"}  # out.bias is held fixed
    Ds = dense_ggn(model, X, params=[model.inp.weight, model.inp.bias, model.out.weight])
    assert rel(sub.diagonal(), Ds.diagonal()) < RTOL


def test_batched_pullback_equals_row_loop():
    torch.manual_seed(1)
    lin1, lin2 = nn.Linear(3, 4).double(), nn.Linear(4, 2).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    s1 = lin1(x)
    s2 = lin2(torch.relu(s1))
    out = torch.cat([s2, s2.pow(2)], dim=1)
    B = torch.randn(5, 3, 4, dtype=torch.float64)
    batched = pullback(out, [s1, s2], B)
    rows = list(pullback_rows(out, [s1, s2], B))
    assert len(rows) == 3 and batched[0].shape == (3, 5, 4)
    for j in range(2):
        ref = torch.stack([r[j] for r in rows])
        assert rel(batched[j], ref) < 1e-14
    # row r at s2 is Σ_n ∂(B_n out_n)_r / ∂s2: check one entry by hand
    g = B[:, 0, :2] + 2 * s2.detach() * B[:, 0, 2:]
    assert rel(rows[0][1], g) < 1e-14


def test_per_sample_formulas_against_brute_force():
    torch.manual_seed(2)
    G = torch.randn(4, 6, 3, dtype=torch.float64)
    A = torch.randn(4, 6, 5, dtype=torch.float64)
    per = torch.einsum("ntg,nta->nga", G, A)
    assert rel(per_sample_sq_sum(G, A), per.pow(2).sum(0)) < 1e-14
    assert rel(per_sample_sq_sum(G, A, memory_elements=1), per.pow(2).sum(0)) < 1e-14
    ref = per.pow(2).sum()
    assert float(per_sample_sq_norms(G, A)) == pytest.approx(float(ref), rel=1e-14)
    G2, A2 = torch.randn(4, 2, 6, dtype=torch.float64), torch.randn(4, 2, 5, dtype=torch.float64)
    ref2 = torch.einsum("ntg,nta->nga", G2, A2).pow(2).sum()  # T small: the Gram form
    assert float(per_sample_sq_norms(G2, A2, memory_elements=1)) == pytest.approx(
        float(ref2), rel=1e-14)
    G1, A1 = G[:, :1], A[:, :1]  # T = 1: the outer-product shortcut
    assert rel(per_sample_sq_sum(G1, A1), torch.einsum("ntg,nta->nga", G1, A1).pow(2).sum(0)
               ) < 1e-14
