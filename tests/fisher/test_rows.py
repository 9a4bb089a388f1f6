"""RowFisher (rows of B_n J_n held per layer) against the dense float64 reference."""

import pytest
import torch
from torch import nn

from natgrad.fisher import EmpiricalFisher, ExactFisher, MCFisher
from natgrad.fisher.dense import dense_ggn
from natgrad.fisher.rows import RowFisher, row_bytes

RTOL = 1e-10


def rel(a, b):
    return float((a - b).norm() / b.norm())


class _Mixed(nn.Module):
    """Conv (dense rows), Linear (Kronecker rows), a Linear over a sequence (T = 2: dense rows)
    and a parameter outside every layer (generic rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, stride=2, padding=1)
        self.seq = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 6))
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x))  # (m, 2, 2, 2)
        h = torch.tanh(self.seq(h.reshape(x.shape[0], 2, 4)))  # (m, 2, 3): T = 2
        return self.out(h.flatten(1) * self.scale)


@pytest.fixture
def mixed():
    torch.manual_seed(0)
    return _Mixed().double(), torch.randn(7, 1, 4, 4, dtype=torch.float64)


@pytest.mark.parametrize("cls", [ExactFisher, MCFisher, EmpiricalFisher])
def test_row_fisher_matches_dense(cls, mixed):
    model, X = mixed
    y = torch.randint(0, 3, (X.shape[0],))
    op = cls(model, (X, y), chunk_size=3)
    rf = RowFisher.from_ggn(op)
    kinds = {b.name: type(b).__name__ for b in rf.blocks}
    assert kinds == {"conv": "_DenseBlock", "seq": "_DenseBlock", "out": "_KronBlock",
                     "": "_DenseBlock"}
    F = op.to_dense()
    if cls is ExactFisher:
        assert rel(F, dense_ggn(model, X)) < RTOL
    assert rel(rf.to_dense(), F) < RTOL
    V = torch.randn(op.dim, 4, dtype=torch.float64)
    assert rel(rf @ V, F @ V) < RTOL
    assert rel(rf.diagonal(), F.diagonal()) < RTOL
    assert rel(rf.gram(), F) < RTOL
    traces = rf.layer_traces()
    for name in ("conv", "seq", "out"):
        idx = torch.cat([torch.arange(op.offsets[i], op.offsets[i + 1])
                         for i in op.block_indices(name)])
        assert traces[name] == pytest.approx(float(F.diagonal()[idx].sum()), rel=RTOL)
        blk = rf.block(name)
        assert isinstance(blk, RowFisher) and blk.names == op.block(name).names
        assert rel(blk.to_dense(), F[idx][:, idx]) < RTOL
        assert rel(blk.gram(), F[idx][:, idx]) < RTOL
    split = rf.restrict(["out.weight", "scale"])  # splits a layer: generic restriction
    idx = torch.cat([torch.arange(op.offsets[i], op.offsets[i + 1])
                     for i in (op.names.index("scale"), op.names.index("out.weight"))])
    assert rel(split.to_dense(), F[idx][:, idx]) < RTOL


def test_row_bytes_and_budget(mixed):
    model, X = mixed
    op = ExactFisher(model, (X, torch.randint(0, 3, (7,))), chunk_size=3)
    rf = RowFisher.from_ggn(op)
    held = rf.nbytes
    assert row_bytes(op) == held > 0
    assert RowFisher.from_ggn(op, max_bytes=held - 1) is None
    assert RowFisher.from_ggn(op, max_bytes=held) is not None
    assert rf.rank_bound == op.rank_bound and rf.num_samples == 7


def test_cnn_with_pooling_float32_close_to_operator():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                          nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16, 10))
    X, y = torch.randn(40, 1, 8, 8), torch.randint(0, 10, (40,))
    op = ExactFisher(model, (X, y), chunk_size=16)
    rf = RowFisher.from_ggn(op)
    V = torch.randn(op.dim, 3)
    assert rel(rf @ V, op @ V) < 1e-5  # float32 rounding only
    op64 = ExactFisher(model.double(), (X.double(), y), chunk_size=16)
    assert rel(RowFisher.from_ggn(op64).diagonal(), dense_ggn(model, X.double()).diagonal()
               ) < RTOL
