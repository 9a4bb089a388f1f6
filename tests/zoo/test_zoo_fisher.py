"""The zoo models' Fisher in float64 against a dense ``torch.func`` reference: the exact trace,
diagonal and Fisher-vector products, ``analyze()`` end to end, and the K-FAC blocks that are
exact (every norm layer's per-channel block; a linear layer at one position on one datum)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _zoo_cases import (
    CASES,
    Case,
    batch,
    build,
    cases,
    close,
    dense_fisher,
    f64,
    flat_indices,
    logits,
    norm_layers,
)

import natgrad
from natgrad.fisher import ExactFisher, KFACOperator, exact_diagonal, exact_trace
from natgrad.fisher.analysis import analyze

SAMPLES = 4


def prepared(case: Case):
    """The case's model in float64, eval mode (BatchNorm on its running statistics: samples
    independent), with a few samples."""
    model = build(case, f64).eval()
    x, y = batch(case, SAMPLES, seed=1, dtype=f64)
    return model, x, y


@pytest.mark.parametrize("case", cases("trace"))
def test_exact_trace_and_diagonal(case: Case):
    model, x, y = prepared(case)
    F_ref = dense_fisher(model, x)
    op = ExactFisher(model, (x, y), chunk_size=3)
    assert op.dim == F_ref.shape[0]
    close(exact_trace(op).value, F_ref.trace(), case.rtol)
    close(op.diagonal(), F_ref.diagonal(), case.rtol)
    close(exact_diagonal(op).value, F_ref.diagonal(), case.rtol)


@pytest.mark.parametrize("case, mode", cases("products", ("recomputed", "cached")))
def test_fisher_vector_products(case: Case, mode: str):
    """``F v``, ``F V`` and the per-parameter form, the forward passes recomputed for each
    product or cached (linearised) and reused."""
    model, x, y = prepared(case)
    F_ref = dense_fisher(model, x)
    op = ExactFisher(model, (x, y), chunk_size=3, cache=mode == "cached")
    V = torch.randn(op.dim, 2, generator=torch.Generator().manual_seed(2), dtype=f64)
    close(op @ V[:, 0], F_ref @ V[:, 0], case.rtol)
    close(op @ V, F_ref @ V, case.rtol)
    close(op.flatten(op @ op.unflatten(V[:, 1])), F_ref @ V[:, 1], case.rtol)


def test_products_through_forward_mode_with_a_padding_row():
    """BERT with eager attention (the products take forward-mode AD) on ids that contain its
    padding token (``pad_token_id=0``): autograd gives the padding row no gradient, so the
    reference's Jacobian has none either."""
    case = next(c for c in CASES if c.name == "bert")
    model = build(case, f64).eval()
    model.set_attn_implementation("eager")
    x, y = batch(case, SAMPLES, seed=1, dtype=f64)
    assert (x == model.config.pad_token_id).any()
    F_ref = dense_fisher(model, x)
    op = ExactFisher(model, (x, y), chunk_size=3)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(2), dtype=f64)
    close(op @ v, F_ref @ v, case.rtol)


@pytest.mark.parametrize("case", cases("analyze"))
def test_analyze_end_to_end(case: Case):
    model, x, y = prepared(case)
    report = analyze(model, (x, y), "cross_entropy", top_k=3, probes=2, slq_steps=8)
    F_ref = dense_fisher(model, x)
    assert report["params"] == F_ref.shape[0] and report["samples"] == SAMPLES
    assert report["trace"]["exact"]
    close(report["trace"]["value"], F_ref.trace(), case.rtol)
    top = torch.linalg.eigvalsh(F_ref).flip(0)[:3]
    close(torch.tensor(report["top_eigenvalues"][:1]), top[:1], max(case.rtol, 1e-6))
    for layer in report["layers"]:  # per-layer traces: the dense block's
        module = model.get_submodule(layer["name"])
        idx = flat_indices(model, list(module.parameters(recurse=False)))
        close(layer["trace"], F_ref[idx][:, idx].trace(), case.rtol)
    for approx in report["approximations"].values():
        assert approx["relative_error"]["value"] >= 0


def _per_channel_mask(params: list[torch.Tensor]) -> torch.Tensor:
    """True where two entries of a norm layer's ``[γ; β]`` belong to the same channel."""
    channel = torch.cat([torch.arange(p.numel()) for p in params])
    return channel[:, None] == channel[None, :]


def _kfac_operator(model, x, y, capture: str) -> KFACOperator:
    if capture == "data":
        return KFACOperator.from_data(model, (x, y), fisher="exact")
    opt = natgrad.KFAC(model, lr=1e-3, kl_clip=None, fisher="exact")
    out = logits(model(x))
    F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
    opt.step()
    return KFACOperator.from_optimizer(opt)


@pytest.mark.parametrize("case, capture", cases("blocks", ("data", "optimizer")))
def test_exact_kfac_blocks(case: Case, capture: str):
    """On one datum: every norm layer's block is the dense per-channel ``(γ_c, β_c)`` block, and
    the linear layers at one position have ``A ⊗ G`` equal to their dense Fisher block; from
    ``KFACOperator.from_data`` (eval mode) and from the optimizer's own capture
    (``fisher="exact"``, train mode: BatchNorm normalises the one datum with its own
    statistics, still a per-sample function)."""
    model, x, y = prepared(case)
    x, y = x[:1], y[:1]
    if capture == "optimizer":
        model.train()
    F_ref = dense_fisher(model, x)
    K = _kfac_operator(model, x, y, capture)
    norms = norm_layers(model)
    assert norms and set(norms) | set(case.exact_layers) <= set(K.layers)
    eye = torch.eye(K.dim, dtype=f64)
    for name in [*norms, *case.exact_layers]:
        params = K.layers[name].params
        idx = flat_indices(model, params)
        block = (K @ eye[:, idx])[idx]
        expected = F_ref[idx][:, idx]
        if name in norms:
            expected = expected * _per_channel_mask(params)
        close(block, expected, case.rtol)


def test_dense_reference_counts_both_uses_of_a_tied_weight():
    """The reference itself: a weight used twice (tied embedding and head) is differentiated
    through both uses — checked against a finite difference of the logits."""
    torch.manual_seed(0)

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(5, 3)
            self.head = torch.nn.Linear(3, 5, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(torch.tanh(self.emb(ids)))

    model = Tied().double()
    ids = torch.tensor([[1, 3], [4, 0]])
    F_ref = dense_fisher(model, ids)
    assert F_ref.shape == (15, 15)
    w = model.emb.weight
    v = torch.randn(15, dtype=f64)
    eps = 1e-6
    with torch.no_grad():
        w += eps * v.view(5, 3)
        up = model(ids)
        w -= 2 * eps * v.view(5, 3)
        down = model(ids)
        w += eps * v.view(5, 3)
        out = model(ids)
    Jv = (up - down) / (2 * eps)  # (N, T, V)
    p = out.softmax(-1)
    quad = ((p * Jv**2).sum(-1) - (p * Jv).sum(-1) ** 2).sum(1).mean()
    close(v @ F_ref @ v, quad, 1e-7)
