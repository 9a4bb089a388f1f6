"""The Fisher operators and the analysis on the architectures users bring (issue 24), against
dense float64 ``torch.func.jacrev`` references (:func:`conftest.dense_fisher`):

* nets with several normalization layers (``analyze()`` end to end, every layer's numbers);
* tied and reused parameters (every use counts: the per-sample gradient of a shared parameter is
  the sum over its uses before squaring);
* in-place operations (``ReLU(inplace=True)``, ``out += shortcut``) in the analysis' K-FAC capture;
* ``F.scaled_dot_product_attention``, which has no forward-mode AD on CPU (the reverse-mode path),
  including a transformers GPT-2 built from a tiny config;
* in-place activations under the cached linearised forward, reused many times;
* ``nn.Embedding(padding_idx=...)`` under forward-mode AD (its padding row gets no gradient).
"""

from __future__ import annotations

import pytest
import torch

from natgrad.curvature import discover
from natgrad.fisher import EmpiricalFisher, ExactFisher, KFACOperator, MCFisher, exact_trace
from natgrad.fisher.analysis import analyze
from natgrad.fisher.kfac import layer_traces
from natgrad.fisher.layer_diagonal import recognised_layers
from natgrad.fisher.rows import RowFisher

f64 = torch.float64
CASES = ["residual_inplace", "transformer_sdpa", "transformer_tied", "reused"]


def close(a, b, rtol=1e-10):
    """``max|a − b| ≤ rtol · max|b|``."""
    a, b = torch.as_tensor(a, dtype=f64), torch.as_tensor(b, dtype=f64)
    err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))
    assert err <= rtol, f"relative error {err:.3g} > {rtol:g}"


def _probes(dim: int, k: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(dim, k, generator=torch.Generator().manual_seed(seed), dtype=f64)


@pytest.mark.parametrize("case", CASES)
def test_exact_fisher_trace_diagonal_products_equal_dense(case, zoo):
    model, x, y = zoo.build(case)
    F = zoo.dense_fisher(model, x)
    op = ExactFisher(model, (x, y), chunk_size=2)
    V = _probes(op.dim)
    close(op @ V, F @ V)
    close(op.diagonal(), F.diagonal())
    close(exact_trace(op).value, torch.trace(F))
    rows = RowFisher.from_ggn(op)
    close(rows @ V, F @ V)
    close(rows.diagonal(), F.diagonal())
    for name in discover(model).layers:  # every layer block, also one of several norm layers
        idx = torch.cat([torch.arange(op.offsets[i], op.offsets[i + 1])
                         for i in op.block_indices(name)])
        close(rows.block(name).gram(), F[idx][:, idx])


def test_gpt2_from_a_tiny_config(zoo):
    """Tied ``wte``/``lm_head``, default ``"sdpa"`` attention, a ``ModelOutput`` with ``.logits``
    (found without ``output_key``)."""
    model, x, y = zoo.build("gpt2")
    F = zoo.dense_fisher(model, x)
    op = ExactFisher(model, (x, y), chunk_size=2)
    assert op.output_shape == (x.shape[1], 23)
    V = _probes(op.dim, 2)
    close(op @ V, F @ V)
    close(op.diagonal(), F.diagonal())
    close(exact_trace(op).value, torch.trace(F))
    assert op.jacobian_mode == "reverse"
    E = EmpiricalFisher(model, (x, y), chunk_size=2)
    close(E @ V, zoo.dense_fisher(model, x, "empirical", y) @ V)


def test_every_use_of_a_shared_parameter_counts(zoo):
    """The fast layer path is refused, with the reason, for each way a parameter is shared; the
    diagonal of the tied embedding counts both uses (one use alone is measurably different)."""
    model, x, y = zoo.build("reused")
    reasons: dict[str, str] = {}
    slots = recognised_layers(ExactFisher(model, (x, y)), reasons)
    assert set(slots) == set()
    assert "shares a parameter" in reasons["head"]
    assert "exactly once" in reasons["twice"]
    assert "not its rows'" in reasons["again"]
    tied, xt, yt = zoo.build("transformer_tied")
    untied, _, _ = zoo.build("transformer_untied")
    untied.load_state_dict(tied.state_dict())  # the same weights, the head its own copy
    d_tied = ExactFisher(tied, (xt, yt)).diagonal()
    d_untied = ExactFisher(untied, (xt, yt), params=["tok"]).diagonal()
    assert float((d_tied[:d_untied.numel()] - d_untied).abs().max()) > 1e-3


def test_mc_and_empirical_fishers_of_shared_parameters_equal_dense(zoo):
    model, x, y = zoo.build("reused")
    V = _probes(sum(p.numel() for p in model.parameters()))
    E = EmpiricalFisher(model, (x, y), chunk_size=2)
    ref = zoo.dense_fisher(model, x, "empirical", y)
    close(E @ V, ref @ V)
    close(E.diagonal(), ref.diagonal())
    M = MCFisher(model, (x, y), chunk_size=2, mc_samples=2, seed=3)
    close(M.diagonal(), M.to_dense().diagonal())


@pytest.mark.parametrize("fisher", ["exact", "mc", "empirical"])
def test_sdpa_models_work_in_every_operator(fisher, zoo):
    """The same transformer with ``F.scaled_dot_product_attention`` (reverse-mode path) and with
    the attention written out (forward mode): every operator and estimator agrees."""
    (sdpa, x, y), (eager, _, _) = zoo.build("transformer_sdpa"), zoo.build("transformer_eager")
    cls = {"exact": ExactFisher, "mc": MCFisher, "empirical": EmpiricalFisher}[fisher]
    kw = {"mc_samples": 2, "seed": 1} if fisher == "mc" else {}
    a = cls(sdpa, (x, y), chunk_size=2, **kw)
    b = cls(eager, (x, y), chunk_size=2, **kw)
    V = _probes(a.dim)
    close(a @ V, b @ V)
    assert (a.jacobian_mode, b.jacobian_mode) == ("reverse", "forward")
    assert "forward AD" in a.jacobian_mode_reason
    close(a.diagonal(), b.diagonal())
    close(exact_trace(a).value, exact_trace(b).value)
    cached = cls(sdpa, (x, y), chunk_size=2, cache=True, cache_bytes=None, **kw)
    close(cached @ V, b @ V)
    close(cached @ V, b @ V)  # from the cache
    if fisher == "exact":
        close(a.to_dense(), zoo.dense_fisher(eager, x))


@pytest.mark.parametrize("fisher", ["exact", "mc", "empirical"])
def test_kfac_from_data_is_immune_to_in_place_ops(fisher, zoo):
    """K-FAC factors from the analysis' capture: the net with ``ReLU(inplace=True)`` and
    ``out += shortcut`` gives the blocks of the same net without in-place ops; the norm layers'
    2×2 blocks are the exact per-channel blocks of the Fisher (exact Fisher)."""
    model, X, y = zoo.build("residual_inplace")
    plain, _, _ = zoo.build("residual_plain")
    K = KFACOperator.from_data(model, (X, y), fisher=fisher, chunk_size=2, seed=2)
    Kp = KFACOperator.from_data(plain, (X, y), fisher=fisher, chunk_size=2, seed=2)
    assert set(K.layers) == set(Kp.layers) == set(discover(model).layers)
    close(K.to_dense(), Kp.to_dense(), rtol=1e-12)
    if fisher != "exact":
        return
    F = zoo.dense_fisher(plain, X)
    for name in ("bn0", "bn1", "bn2"):
        idx = torch.cat([torch.arange(K.offsets[i], K.offsets[i + 1])
                         for i in K.block_indices(name)])
        C = len(idx) // 2
        same = torch.arange(2 * C) % C
        mask = same[:, None] == same[None, :]  # (γ_c, β_c) pairs of one channel
        close(K.block(name).to_dense(), F[idx][:, idx] * mask)


@pytest.mark.parametrize(("case", "cache"), [
    ("residual_inplace", True), ("residual_inplace", False), ("transformer_sdpa", True),
    ("transformer_sdpa", False), ("gpt2", True)])
def test_analyze_end_to_end(case, cache, zoo):
    """``analyze()`` on a net with three normalization layers, on a transformer block with
    SDPA and three LayerNorms, and on a tiny GPT-2 (tied embedding, SDPA): the total and
    per-layer traces and the per-layer top eigenvalues against the dense Fisher."""
    model, x, y = zoo.build(case)
    F = zoo.dense_fisher(model, x)
    report = analyze(model, (x, y), "cross_entropy", top_k=3, probes=2, slq_steps=6,
                     chunk_size=2, cache=cache, density=cache)
    close(report["trace"]["value"], torch.trace(F))
    close(report["top_eigenvalues"], torch.linalg.eigvalsh(F).flip(0)[:3], rtol=1e-6)
    assert report["jacobian"]["mode"] == ("forward" if case == "residual_inplace" else "reverse")
    assert ("no forward-mode AD" in report["products"]["method"]) == (
        not cache and case != "residual_inplace")
    op = ExactFisher(model, (x, y))
    layers = discover(model).layers
    assert [row["name"] for row in report["layers"]] == list(layers)
    for row in report["layers"]:
        idx = torch.cat([torch.arange(op.offsets[i], op.offsets[i + 1])
                         for i in op.block_indices(row["name"])])
        block = F[idx][:, idx]
        close(row["trace"], torch.trace(block))
        k = len(row["top_eigenvalues"])
        close(row["top_eigenvalues"], torch.linalg.eigvalsh(block).flip(0)[:k], rtol=1e-9)


def test_layer_traces_of_norm_and_tied_layers(zoo):
    """:func:`natgrad.fisher.kfac.layer_traces` (the analysis without rows) on every layer kind
    of a tied transformer: norm layers and the tied embedding by the generic path."""
    model, x, y = zoo.build("transformer_tied")
    F = zoo.dense_fisher(model, x)
    op = ExactFisher(model, (x, y), chunk_size=2)
    traces = layer_traces(op, discover(model).layers)
    for name, value in traces.items():
        idx = torch.cat([torch.arange(op.offsets[i], op.offsets[i + 1])
                         for i in op.block_indices(name)])
        close(value, torch.trace(F[idx][:, idx]))


@pytest.mark.parametrize("columns", [1, 3])
def test_cached_products_with_in_place_activations_do_not_drift(columns, zoo):
    """``Hardswish(inplace=True)`` and ``h += shortcut``: every product from the cached
    linearised forward (one column, or a ``(P, 3)`` block) is the dense Fisher's, however
    often the cache is reused."""
    model, x, y = zoo.build("inplace_act")
    F = zoo.dense_fisher(model, x)
    op = ExactFisher(model, (x, y), chunk_size=2, cache=True)
    V = _probes(op.dim, columns)
    for _ in range(4):
        close(op @ V, F @ V)
    assert op.jacobian_mode == "forward" and len(op._cache) == 3


@pytest.mark.parametrize("case", ["padded", "padded_tied"])
@pytest.mark.parametrize("cache", [False, True])
def test_forward_mode_products_with_a_padding_row(case, cache, zoo):
    """``nn.Embedding(padding_idx=0)`` on ids that contain it: the forward-mode products (plain
    ``jvp`` or linearised) equal the dense Fisher, whose padding row and column are zero (no
    gradient reaches the padding row) unless the weight is tied to the head, and equal the
    reverse-mode path's products."""
    model, x, y = zoo.build(case)
    F = zoo.dense_fisher(model, x)
    pad = torch.arange(model.tok.weight.shape[1])  # the padding row's entries, first in order
    assert bool(F[pad].abs().max() == 0) == (case == "padded")
    op = ExactFisher(model, (x, y), chunk_size=2, cache=cache)
    V = _probes(op.dim, 2)
    for _ in range(2):
        close(op @ V, F @ V)
        close(op @ V[:, 0], F @ V[:, 0])
    assert op.jacobian_mode == "forward"
    rev = ExactFisher(model, (x, y), chunk_size=2)
    rev.jacobian_mode = "reverse"
    close(rev @ V, F @ V)
    E = EmpiricalFisher(model, (x, y), chunk_size=2)
    close(E @ V, zoo.dense_fisher(model, x, "empirical", y) @ V)


def test_reverse_mode_rows_come_in_bounded_blocks(zoo, monkeypatch):
    """The exact Fisher of a sequence without forward-mode AD has ``T·V`` rows per sample: they
    are formed a block of rows at a time when one sample's rows exceed the block size, in the
    same order and with the same values, and products and the diagonal are unchanged."""
    from natgrad.fisher import ggn

    model, x, y = zoo.build("transformer_sdpa")
    op = ExactFisher(model, (x, y), chunk_size=2)
    whole = torch.cat(list(op.sample_rows(1 << 40)))
    blocked = list(op.sample_rows(op.dim * 3))  # three rows per vmapped backward
    assert max(U.shape[0] for U in blocked) == 3 < whole.shape[0] // len(x)
    close(torch.cat(blocked), whole)
    V = _probes(op.dim)
    ref = op @ V
    monkeypatch.setattr(ggn, "ROW_BLOCK_ELEMENTS", op.dim * 5)
    close(ExactFisher(model, (x, y), chunk_size=2) @ V, ref)


def test_analyze_refuses_reverse_mode_rows_beyond_the_budget(zoo):
    """A budget smaller than twice one sample's rows of B_n J_n fails before any product, naming
    the Monte-Carlo Fisher (one row per sample)."""
    from natgrad.fisher.budget import BudgetError

    model, x, y = zoo.build("transformer_sdpa")
    per_sample = ExactFisher(model, (x, y)).row_bytes_per_sample()
    with pytest.raises(BudgetError, match="fisher='mc'"):
        analyze(model, (x, y), "cross_entropy", top_k=2, memory_bytes=per_sample)
