"""One pass for the rows and the K-FAC statistics equals the two separate passes; the products
of several columns by the rows' tall matrices equal plain ones."""

import pytest
import torch
from torch import nn

from natgrad.fisher import EmpiricalFisher, ExactFisher, MCFisher
from natgrad.fisher.kfac import layer_statistics, rows_and_statistics
from natgrad.fisher.rows import RowFisher, tall_matmul, tall_matmul_t


def rel(a, b):
    return float((a - b).norm() / b.norm())


class _ConvSeq(nn.Module):
    """Conv2d, then a Linear applied at 4 positions (T = 4), a Linear head and a free offset."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.seq, self.out = nn.Conv2d(1, 2, 3, padding=1), nn.Linear(8, 3), \
            nn.Linear(12, 3)
        self.offset = nn.Parameter(torch.zeros(12))

    def forward(self, x):
        h = self.seq(torch.relu(self.conv(x)).reshape(len(x), 4, 8))
        return self.out(torch.tanh(h).flatten(1) + self.offset)


@pytest.mark.parametrize("cls", [ExactFisher, MCFisher, EmpiricalFisher])
def test_shared_pass_equals_separate_passes(cls):
    torch.manual_seed(0)
    model = _ConvSeq().double()
    X, y = torch.randn(11, 1, 4, 4, dtype=torch.float64), torch.randint(0, 3, (11,))
    kw = {"seed": 3} if cls is MCFisher else {}
    op = cls(model, (X, y), chunk_size=4, **kw)
    rows, shared = rows_and_statistics(op)
    assert shared is not None
    layers, stats, n = shared
    ref_layers, ref, ref_n = layer_statistics(model, (X, y), "cross_entropy", cls.fisher,
                                              chunk_size=4, seed=kw.get("seed", 0))
    assert n == ref_n == 11 and set(layers) == set(ref_layers) == {"conv", "seq", "out"}
    assert set(stats) == set(ref)
    for name, (A, G, T) in stats.items():
        RA, RG, RT = ref[name]
        assert T == RT
        assert rel(A.moment(), RA.moment()) < 1e-12
        assert rel(G.moment(), RG.moment()) < 1e-12
    # the rows are those built without the statistics
    plain = RowFisher.from_ggn(op)
    V = torch.randn(op.dim, 3, dtype=torch.float64)
    assert rel(rows @ V, plain @ V) < 1e-12


def test_shared_pass_falls_back(tiny_cnn):
    model, X, y = tiny_cnn
    op = ExactFisher(model, (X, y), chunk_size=2)
    sub = op.restrict(op.names[:2])  # the conv layer only: not the K-FAC layers of the model
    rows, shared = rows_and_statistics(sub)
    assert rows is not None and shared is None
    assert rows_and_statistics(op, max_bytes=1) == (None, None)  # rows over budget


@pytest.mark.parametrize("k", [1, 2, 3, 10])
def test_tall_matmul(k):
    torch.manual_seed(0)
    U, V, u = torch.randn(300, 40), torch.randn(40, k), torch.randn(300, k)
    Ud = U.double()
    assert rel(tall_matmul(U, V).double(), Ud @ V.double()) < 1e-6
    assert rel(tall_matmul_t(U, u).double(), Ud.T @ u.double()) < 1e-6
    assert tall_matmul(U, V).shape == (300, k) and tall_matmul_t(U, u).shape == (40, k)
