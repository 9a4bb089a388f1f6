"""The matrix-free Fisher operators on sequence models: integer token ids, logits ``(B, T, V)``,
tuple / dict inputs and structured outputs, against a dense float64 ``torch.func`` reference.

Convention (that of the optimizer, docs/DESIGN.md): a sequence's negative log-likelihood is the
sum over its positions, and the operators average over sequences:
``F = (1/B) Σ_b Σ_t J_btᵀ H_bt J_bt`` (exact), ``(1/B) Σ_b g_b g_bᵀ`` with ``g_b`` the gradient of
the sequence's summed NLL (empirical, and Monte-Carlo with sampled labels).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

import natgrad
from natgrad.curvature import discover
from natgrad.fisher import EmpiricalFisher, ExactFisher, KFACOperator, MCFisher, exact_trace
from natgrad.fisher.analysis import analyze
from natgrad.fisher.kfac import layer_traces
from natgrad.fisher.rows import RowFisher

f64 = torch.float64
V, D, H = 7, 4, 5
B, T = 3, 4


class SeqToy(nn.Module):
    """Embedding → Linear on (B, T, d) → tanh → vocabulary head; ``mix`` adds a causal running
    mean so that positions interact."""

    def __init__(self, mix: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.lin = nn.Linear(D, H)
        self.head = nn.Linear(H, V)
        self.mix = mix

    def logits(self, e: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(e))
        if self.mix:
            h = h.cumsum(-2) / torch.arange(1, h.shape[-2] + 1, dtype=h.dtype).unsqueeze(-1)
        return self.head(h)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.logits(self.emb(ids))


class TupleToy(SeqToy):
    """Called as ``model(ids, weight)``: a float weight per token scales the embeddings."""

    def forward(self, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.logits(self.emb(ids) * weight.unsqueeze(-1))


class DictToy(TupleToy):
    """Called as ``model(**{"ids": ..., "weight": ...})``; returns ``{"logits": ...}``."""

    def forward(self, ids: torch.Tensor, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": super().forward(ids, weight), "hidden": ids}


class TupleOutToy(SeqToy):
    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(ids), ids


def _model(cls=SeqToy, **kw) -> nn.Module:
    torch.manual_seed(0)
    return cls(**kw).double().eval()


def _tokens(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


# ---------------------------------------------------------------- the dense reference
def _jacobian(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(B, T, V)`` and their Jacobian ``(B, T, V, P)`` (named_parameters order)."""
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for _, p in model.named_parameters()]

    def f(*ps: torch.Tensor) -> torch.Tensor:
        return functional_call(model, dict(zip(names, ps)), (ids,))

    jac = jacrev(f, argnums=tuple(range(len(params))))(*params)
    J = torch.cat([j.reshape(*ids.shape, V, -1) for j in jac], dim=3)
    with torch.no_grad():
        return f(*params), J


def dense_exact(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``(1/B) Σ_b Σ_t J_btᵀ (diag p_bt − p_bt p_btᵀ) J_bt``."""
    logits, J = _jacobian(model, ids)
    p = torch.softmax(logits, -1)
    Hs = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)  # (B, T, V, V)
    return torch.einsum("btvp,btvw,btwq->pq", J, Hs, J) / ids.shape[0]


def dense_label_fisher(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(1/B) Σ_b g_b g_bᵀ``, ``g_b = Σ_t J_btᵀ (p_bt − e_{y_bt})`` for labels ``(S, B, T)``
    (averaged over the ``S`` label draws)."""
    logits, J = _jacobian(model, ids)
    p = torch.softmax(logits, -1)
    out = 0
    for y in labels:
        r = p - F.one_hot(y, V).to(f64)  # (B, T, V)
        g = torch.einsum("btv,btvp->bp", r, J)
        out = out + g.T @ g / B
    return out / len(labels)


def _dense(op) -> torch.Tensor:
    return op @ torch.eye(op.dim, dtype=f64)


def _close(a, b, **kw):
    torch.testing.assert_close(a, b, rtol=kw.get("rtol", 1e-9), atol=kw.get("atol", 1e-12))


# ---------------------------------------------------------------- exact Fisher
@pytest.mark.parametrize("mix", [False, True])
def test_exact_fisher_of_token_ids_equals_dense_reference(mix):
    model = _model(mix=mix)
    ids, y = _tokens()
    ref = dense_exact(model, ids)
    op = ExactFisher(model, (ids, y), chunk_size=2)  # chunks split the sequences consistently
    assert op.num_samples == B
    _close(_dense(op), ref)
    _close(op.gram(), ref)
    _close(op.diagonal(), torch.diagonal(ref))  # Linear layers pulled back, emb per sample
    _close(op.sample_diagonal(), torch.diagonal(ref))
    assert exact_trace(op).value == pytest.approx(float(torch.trace(ref)), rel=1e-10)
    layers = discover(model, list(model.parameters())).layers
    traces = layer_traces(op, {n: layers[n] for n in ("lin", "head")})
    for name, t in traces.items():
        idx = op.block_indices(name)
        sl = slice(op.offsets[idx[0]], op.offsets[idx[-1] + 1])
        assert t == pytest.approx(float(torch.trace(ref[sl, sl])), rel=1e-10)
    assert op.rank_bound == B * T * V


def test_row_fisher_of_a_sequence_model_equals_dense_reference():
    model = _model(mix=True)
    ids, y = _tokens()
    ref = dense_exact(model, ids)
    rows = RowFisher.from_ggn(ExactFisher(model, (ids, y), chunk_size=2))
    _close(_dense(rows), ref)
    _close(rows.diagonal(), torch.diagonal(ref))
    _close(rows.gram(), ref)


def test_sequences_of_several_lengths():
    model = _model(mix=True)
    ids, y = _tokens()
    short = torch.randint(0, V, (2, T - 1), generator=torch.Generator().manual_seed(3))
    loader = [(ids, y), (short, short)]
    ref = (B * dense_exact(model, ids) + 2 * dense_exact(model, short)) / (B + 2)
    op = ExactFisher(model, loader)
    _close(_dense(op), ref)
    _close(op.diagonal(), torch.diagonal(ref))
    assert op.rank_bound == (B * T + 2 * (T - 1)) * V
    with pytest.raises(ValueError, match="RowFisher needs the same number"):
        RowFisher.from_ggn(op)
    with pytest.raises(ValueError, match="RowFisher needs the same number"):
        RowFisher.from_ggn(ExactFisher(model, loader[::-1]))


def test_cached_products_equal_uncached():
    model = _model(mix=True)
    ids, y = _tokens()
    ref = dense_exact(model, ids)
    op = ExactFisher(model, (ids, y), cache=True, max_columns=3)
    _close(_dense(op), ref)
    _close(_dense(op), ref)  # from the cache


# ---------------------------------------------------------------- empirical and Monte-Carlo
def test_empirical_fisher_uses_per_sequence_gradients():
    model = _model(mix=True)
    ids, y = _tokens()
    ref = dense_label_fisher(model, ids, y[None])
    op = EmpiricalFisher(model, (ids, y), chunk_size=2)
    _close(_dense(op), ref)
    _close(op.gram(), ref)
    _close(op.diagonal(), torch.diagonal(ref))
    assert op.rank_bound == B


def test_empirical_fisher_refuses_targets_of_the_wrong_shape():
    model = _model()
    ids, y = _tokens()
    with pytest.raises(ValueError, match="target"):
        _dense(EmpiricalFisher(model, (ids, y[:, :2])))


@pytest.mark.parametrize("samples", [1, 3])
def test_mc_fisher_is_its_definition_with_the_seeded_labels(samples):
    model = _model(mix=True)
    ids, y = _tokens()
    seed = 5
    with torch.no_grad():
        p = torch.softmax(model(ids), -1).reshape(-1, V)
    gen = torch.Generator().manual_seed(seed)  # one chunk: the generator of chunk 0
    labels = torch.stack([torch.multinomial(p, 1, generator=gen).reshape(B, T)
                          for _ in range(samples)])
    ref = dense_label_fisher(model, ids, labels)
    op = MCFisher(model, (ids, y), mc_samples=samples, seed=seed)
    _close(_dense(op), ref)
    _close(op.diagonal(), torch.diagonal(ref))


def test_mc_fisher_converges_to_the_exact_fisher():
    model = _model(mix=True)
    ids, _ = _tokens()
    ref = dense_exact(model, ids)
    mc = _dense(MCFisher(model, (ids,), mc_samples=3000, seed=1))
    assert float((mc - ref).norm() / ref.norm()) < 0.08


# ---------------------------------------------------------------- structured inputs and outputs
def _weights() -> torch.Tensor:
    return torch.ones(B, T, dtype=torch.float32)  # float32: cast to the model's float64


@pytest.mark.parametrize("kind", [ExactFisher, EmpiricalFisher])
def test_tuple_and_dict_inputs_give_the_plain_operator(kind):
    ids, y = _tokens()
    ref = _dense(kind(_model(), (ids, y)))
    w = _weights()
    _close(_dense(kind(_model(TupleToy), ((ids, w), y), chunk_size=2)), ref)
    _close(_dense(kind(_model(DictToy), ({"ids": ids, "weight": w}, y), chunk_size=2)), ref)
    loader = [((ids[:2], w[:2]), y[:2]), ((ids[2:], w[2:]), y[2:])]  # batches of structures
    op = kind(_model(TupleToy), loader)
    assert op.num_samples == B
    _close(_dense(op), ref)
    _close(op.diagonal(), torch.diagonal(ref))


def test_tuple_output_needs_output_key():
    ids, y = _tokens()
    ref = _dense(ExactFisher(_model(), (ids, y)))
    with pytest.raises(ValueError, match="output_key"):
        ExactFisher(_model(TupleOutToy), (ids, y))
    _close(_dense(ExactFisher(_model(TupleOutToy), (ids, y), output_key=0)), ref)
    with pytest.raises(ValueError, match="output_key"):
        ExactFisher(_model(), (ids, y), output_key=1.5)


def test_inputs_of_different_batch_sizes_are_refused():
    ids, y = _tokens()
    with pytest.raises(ValueError, match="leading size"):
        ExactFisher(_model(TupleToy), ((ids, torch.ones(B + 1, T)), y))


# ---------------------------------------------------------------- K-FAC and the analysis
@pytest.mark.parametrize("fisher", ["exact", "empirical"])
def test_kfac_from_data_equals_the_optimizer_factors(fisher):
    model = _model(mix=True)
    ids, y = _tokens()
    K = KFACOperator.from_data(model, (ids, y), fisher=fisher, chunk_size=2)
    trained = copy.deepcopy(model).train()
    opt = natgrad.KFAC(trained, lr=0.1, kl_clip=None, fisher=fisher)
    logits = trained(ids)
    loss = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1), reduction="sum") / B
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert set(K.factors) == {"emb", "lin", "head"}
    for name in K.factors:
        for f_data, f_opt in zip(K.factors[name], opt.factors[name]):
            _close(f_data.to_dense(), f_opt.to_dense())


@pytest.mark.parametrize("fisher", ["exact", "mc", "empirical"])
def test_analyze_a_sequence_model(fisher):
    model = _model(mix=True)
    ids, y = _tokens()
    report = analyze(model, (ids, y), "cross_entropy", fisher=fisher, top_k=3, probes=2,
                     slq_steps=8, chunk_size=2)
    if fisher == "exact":
        ref = dense_exact(model, ids)
        assert report["trace"]["value"] == pytest.approx(float(torch.trace(ref)), rel=1e-9)
        top = torch.linalg.eigvalsh(ref).flip(0)[:3]
        assert report["top_eigenvalues"] == pytest.approx(top.tolist(), rel=1e-6)
    assert {row["name"] for row in report["layers"]} == {"emb", "lin", "head"}
    assert report["samples"] == B


def test_analyze_a_dict_input_model_with_output_key():
    ids, y = _tokens()
    data = ({"ids": ids, "weight": _weights()}, y)
    plain = analyze(_model(), (ids, y), "cross_entropy", top_k=2, density=False, probes=2)
    report = analyze(_model(DictToy), data, "cross_entropy", top_k=2, density=False, probes=2,
                     output_key="logits")
    assert report["trace"]["value"] == pytest.approx(plain["trace"]["value"], rel=1e-10)


def test_dense_references_refuse_sequence_logits():
    from natgrad.fisher.dense import dense_ggn, layer_fisher_block

    model = _model()
    ids, _ = _tokens()
    with pytest.raises(ValueError, match="ExactFisher"):
        dense_ggn(model, ids)
    with pytest.raises(ValueError, match="ExactFisher"):
        layer_fisher_block(model, model.head, ids)
