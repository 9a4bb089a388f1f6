"""The full analysis behind ``natgrad analyze``: one function from (model, data) to a report dict.

Stages (each timed): exact diagonal → trace and per-layer traces; K-FAC (and projected K-FAC
when that strategy exists) built fresh from the same data; top-``k`` Lanczos and the overlap of
its eigenspace with the approximations'; SLQ (density, ``log det(F + λI)``, effective
dimension); relative errors of the approximations on shared probes, whole and per layer, and the
cross-layer coupling; per-layer top eigenpairs and closed forms. Under a memory budget
(``memory_bytes``) the stages follow a plan (:mod:`natgrad.fisher.budget`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from ..curvature import discover
from ..factors import ProjectedOptions
from ._memory import release_freed_memory
from ._model import Data
from .budget import AnalysisPlan, BudgetError, plan_analysis
from .dual import (
    GramEigenpairs,
    disjoint,
    exact_quadrature,
    gram_eigenvalues,
    gram_topk,
    layer_grams,
    lifted_overlap,
    lifted_residuals,
)
from .ggn import EmpiricalFisher, ExactFisher, GGNOperator, MCFisher
from .kfac import KFACOperator, layer_statistics, layer_traces, rows_and_statistics
from .kron import kfac_logdet, kfac_top_eigenpairs, kfac_top_eigenvalues, kfac_trace
from .lanczos import condition_number, lanczos_topk
from .quality import (
    block_products,
    block_relative_error,
    coupling_strength,
    estimate,
    gaussian_probes,
    relative_error,
    subspace_overlap,
)
from .results import Eigenpairs, Estimate
from .rows import RowFisher, rows_summary
from .slq import effective_dimension, quadrature, slq_logdet, spectral_density

FISHERS: dict[str, type[GGNOperator]] = {
    cls.fisher: cls for cls in (ExactFisher, MCFisher, EmpiricalFisher)
}
#: how ``analyze`` finds the spectrum: ``"gram"`` from the rows' Gram matrix
#: (:mod:`natgrad.fisher.dual`), ``"lanczos"`` from products with ``F``, ``"auto"`` the Gram
#: when the rows are in memory, ``N · R < P`` and it fits (:data:`GRAM_MAX_ROWS`)
SPECTRUM_METHODS = ("auto", "gram", "lanczos")
#: the largest ``N · R`` for which ``"auto"`` forms the Gram (``2 (N R)²`` floats: 1.6 GB at
#: float32); ``"gram"`` goes beyond it
GRAM_MAX_ROWS = 20_000


def _est(e: Estimate) -> dict[str, Any]:
    out = {"value": e.value, "stderr": e.stderr, "samples": e.samples}
    if e.bias:
        out.update(bias=e.bias, error=e.error)
    return out


def _dense_top(op: GGNOperator, k: int) -> tuple[Tensor, Tensor, str]:
    """Top-``k`` eigenvalues of a small block formed densely from per-sample rows, with their
    relative residuals ``‖M v − θ v‖ / θ`` against that matrix."""
    M = op.gram().double()
    theta, Q = torch.linalg.eigh(M)
    values, vectors = theta.flip(0)[:k], Q.flip(1)[:, :k]
    res = (M @ vectors - vectors * values).norm(dim=0) / values.abs().clamp_min(1e-300)
    return values, res, "dense (per-sample rows)"


def _gram_spectrum(rows: RowFisher, groups: dict[str, list[int]], top_k: int, tol: float,
                   seed: int, dense_block_max: int, all_values: bool
                   ) -> tuple[GramEigenpairs, Tensor | None, dict[str, GramEigenpairs]]:
    """The top-``k`` eigenpairs of ``F`` from its rows' Gram, every eigenvalue when
    ``all_values``, and the top eigenpairs of the layers' blocks (``groups``) with more than
    ``dense_block_max`` parameters and more of them than rows. One layer's Gram is alive
    besides the sum (``2 n²`` floats); LAPACK's copy of the sum comes once the layers' are
    gone."""
    n, N = rows.num_samples * rows.rows_per_sample, rows.num_samples
    sizes = {name: sum(rows.sizes[i] for i in idx) for name, idx in groups.items()}
    wanted = {name for name, d in sizes.items() if d > dense_block_max and n < d}
    layer_tops: dict[str, GramEigenpairs] = {}
    if disjoint(groups):  # the layers' Grams add up to the whole one
        K = None
        for name, S in layer_grams(rows, groups):
            if name in wanted:
                layer_tops[name] = gram_topk(S, N, min(top_k, sizes[name]), tol, seed)
            K = S if K is None else K.add_(S)
            del S
    else:  # layers share parameters: the whole Gram, then each wanted layer's on its own
        K = rows.row_gram()
        for name in wanted:
            S = rows.restrict([rows.names[i] for i in groups[name]]).row_gram()
            layer_tops[name] = gram_topk(S, N, min(top_k, sizes[name]), tol, seed)
            del S
    release_freed_memory()
    eigenvalues = gram_eigenvalues(K, N) if all_values else None
    top = gram_topk(K, N, top_k, tol, seed)
    return top, eigenvalues, layer_tops


def analyze(
    model: nn.Module,
    data: Data,
    loss: str,
    fisher: str = "exact",
    top_k: int = 10,
    density: bool = True,
    probes: int = 4,
    slq_steps: int = 40,
    damping: float = 1e-3,
    tol: float = 1e-3,
    projected_rank: int = ProjectedOptions.rank,
    approximations: dict[str, tuple[str, Any]] | None = None,
    seed: int = 0,
    chunk_size: int = 250,
    cache: bool = True,
    cache_bytes: int | None = 1 << 30,
    dense_block_max: int = 2048,
    progress: Callable[[str], None] = lambda stage: None,
    output_key: str | int | None = None,
    memory_bytes: int | None = None,
    on_plan: Callable[[AnalysisPlan], None] = lambda plan: None,
    spectrum: str = "auto",
) -> dict[str, Any]:
    """Analyse the Fisher of ``model`` on ``data``; returns a JSON-ready dict (see the README).

    ``progress(stage)`` is called before each stage (for a progress bar). ``approximations``:
    report key → ``(factor strategy, options)`` of the K-FAC approximations compared with the
    Fisher (default: dense K-FAC as ``"kfac"`` and projected K-FAC at ``projected_rank`` as
    ``"projected_kfac"``); any registered strategy works.

    ``data`` and ``output_key`` are read as by the operators (:mod:`natgrad.fisher.ggn`): tensor,
    tuple or dict inputs (``model(x)``, ``model(*x)``, ``model(**x)``), integer token ids kept,
    outputs of any shape ``(m, ..., C)``; sequence logits ``(B, T, V)`` follow the optimizer's
    convention (a sequence's NLL is the sum over its positions, means over sequences), every
    quantity of the report included (reported as ``output_shape`` and ``positions``).

    Cost, in products with ``F`` (each one linearised forward and one backward per chunk, the
    chunks' forward passes cached within ``cache_bytes``): top-``k`` Lanczos (its run doubles as
    the first SLQ probe), ``probes − 1`` further SLQ runs of ``slq_steps``, ``L · probes`` block
    products for the approximation errors (``F V`` is their sum); per layer, blocks with at most
    ``dense_block_max`` parameters are formed densely from per-sample rows, larger ones get
    Lanczos on the block operator (only that layer differentiated).

    ``memory_bytes``: a budget for everything that grows with the parameters
    (:func:`natgrad.fisher.budget.plan_analysis`): the top-``k`` and per-layer Lanczos runs get
    a bounded (thick-restart) basis, SLQ runs are streamed when their bases do not fit; the
    plan is handed to ``on_plan`` before the first large allocation and reported as
    ``memory_plan``; :class:`~natgrad.fisher.budget.BudgetError` when the request cannot fit.
    ``None``: no plan (plain Lanczos with a basis of up to ``max(4k, 60, slq_steps)`` vectors,
    SLQ bases capped by ``cache_bytes``).

    ``spectrum`` (:data:`SPECTRUM_METHODS`): ``"gram"`` takes the spectrum from the rows' Gram
    matrix ``K = UUᵀ/N`` (``n = N·R`` square, :mod:`natgrad.fisher.dual`): every eigenvalue
    exactly (density, log det and effective dimension exact, no probes), the top-``k`` and the
    large layers' top eigenpairs from products with ``K`` (their residuals measured against
    ``F`` with the lifted vectors), the overlaps without forming the top vectors; it needs the
    rows in memory (``cache=True`` within ``cache_bytes``) and pays ``2 n²`` floats. ``"lanczos"``
    multiplies by ``F`` (the stages above). ``"auto"`` (default): the Gram when the rows are
    held, ``n < P``, ``n ≤`` :data:`GRAM_MAX_ROWS` and (under a budget) it fits.
    """
    if spectrum not in SPECTRUM_METHODS:
        raise ValueError(f"spectrum must be one of {', '.join(SPECTRUM_METHODS)}, got "
                         f"{spectrum!r}")
    if spectrum == "gram" and not cache:
        raise ValueError("spectrum='gram' needs the rows of B_n J_n in memory: cache=True "
                         "(natgrad analyze: --cache-mb above 0)")
    timings: dict[str, float] = {}
    report: dict[str, Any] = {}

    def stage(name: str):
        release_freed_memory()  # what the last stage freed, out of the resident set
        progress(name)
        timings[name] = -time.perf_counter()

    def done(name: str):
        timings[name] += time.perf_counter()

    kw = {"mc_samples": 1, "seed": seed} if fisher == "mc" else {}
    op = FISHERS[fisher](model, data, loss, chunk_size=chunk_size, cache=cache,
                         cache_bytes=cache_bytes, max_columns=1, output_key=output_key, **kw)
    if memory_bytes is not None and op.choose_jacobian_mode() == "reverse":
        # without forward-mode AD every product holds a chunk's rows of B_n J_n: R · P floats
        # per sample (the exact Fisher of a sequence: R = T · V); half the budget at most
        per_sample = op.row_bytes_per_sample()
        if per_sample > memory_bytes // 2:
            raise BudgetError(
                f"the model has no forward-mode AD ({op.jacobian_mode_reason}), so every "
                f"product with the {fisher} Fisher holds each sample's rows of B_n J_n: "
                f"{per_sample / (1 << 30):.2f} GB per sample, more than half the memory "
                f"budget of {memory_bytes / (1 << 30):.2f} GB; use fisher='mc' (natgrad "
                "analyze --fisher mc: one row per sample) or a larger --memory-gb")
        op.chunk_size = max(1, min(op.chunk_size, (memory_bytes // 2) // per_sample))
    layers = discover(model, [p for p in model.parameters() if p.requires_grad]).layers
    groups = {n: op.block_indices(n) for n in layers}
    report.update(params=op.dim, samples=op.num_samples, fisher=fisher, loss=loss,
                  mean_convention="F = (1/N) sum_n J_n^T H_n J_n (mean over samples)",
                  damping=damping, output_shape=list(op.output_shape),
                  jacobian={"mode": op.choose_jacobian_mode(),
                            "reason": op.jacobian_mode_reason})
    if op.likelihood.categorical and len(op.output_shape) > 1:
        report["positions"] = ("per sample: the sum over its positions (sequence logits), "
                               "mean over samples")
    if fisher == "empirical":
        report["note"] = "empirical Fisher: data-label gradient outer products, not a Fisher"

    all_converged = True
    stage("trace")
    # the rows of B_n J_n in memory when they fit the cache budget: later products are a few
    # matmuls per layer, not a pass through the network; they give the exact diagonal for free
    # the same pass also sums the K-FAC statistics (same directions, same layer outputs)
    rows, kfac_stats = rows_and_statistics(op, max_bytes=cache_bytes) if cache else (None, None)
    report["products"] = rows_summary(rows, op.jacobian_mode, cache)
    if rows is not None:
        op = rows
        diag = rows.diagonal()
        layer_trace = {n: float(sum(diag[op.offsets[i]:op.offsets[i + 1]].double().sum()
                                    for i in groups[n])) for n in layers}
        total_trace = sum(float(diag[a:a + (1 << 20)].double().sum())
                          for a in range(0, op.dim, 1 << 20))
        del diag
    else:
        # per layer from R backward passes to the layer outputs; the exact diagonal
        # (per-sample gradients) only for parameters outside every recognised layer
        layer_trace = layer_traces(op, layers)
        covered = {i for idx in groups.values() for i in idx}
        rest = [n for i, n in enumerate(op.names) if i not in covered]
        rest_trace = float(op.restrict(rest).diagonal().double().sum()) if rest else 0.0
        total_trace = sum(layer_trace.values()) + rest_trace
    report["trace"] = {"value": total_trace, "stderr": 0.0, "exact": True}
    done("trace")

    stage("kfac")
    kl, stats, n = kfac_stats or layer_statistics(model, data, loss, fisher, chunk_size,
                                                  seed=seed, output_key=output_key)
    if approximations is None:
        approximations = {"kfac": ("eigh", None),
                          "projected_kfac": ("projected", {"rank": projected_rank})}
    approx_ops = {key: KFACOperator.from_statistics(model, kl, stats, n, strategy, options,
                                                    release_statistics=True)
                  for key, (strategy, options) in approximations.items()}
    del stats, kfac_stats  # the sums are in the factors now (dense ones: one d × d each)
    done("kfac")

    if spectrum == "gram" and rows is None:
        raise ValueError("spectrum='gram' needs the rows of B_n J_n in memory, and they need "
                         f"more than cache_bytes = {cache_bytes} (natgrad analyze: a larger "
                         "--cache-mb), or use spectrum='auto' / 'lanczos'")
    n_rows = rows.num_samples * rows.rows_per_sample if rows is not None else 0
    use_gram = rows is not None and n_rows < op.dim and (
        spectrum == "gram" or (spectrum == "auto" and n_rows <= GRAM_MAX_ROWS))
    plan = None
    if memory_bytes is not None:
        # the stages from here on; what the trace and K-FAC stages left is held throughout
        item = torch.empty((), dtype=op.dtype).element_size()
        held = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        held += rows.nbytes if rows is not None else (cache_bytes or 0) if cache else 0
        held += sum(b.state_bytes() for K in approx_ops.values() for b in K.blocks.values())

        def make_plan(gram_rows: int | None) -> AnalysisPlan:
            return plan_analysis(op.dim, item, held, memory_bytes, top_k=top_k, probes=probes,
                                 slq_steps=slq_steps, density=density, gram_rows=gram_rows)
        if use_gram and spectrum == "auto":
            try:
                plan = make_plan(n_rows)
            except BudgetError:  # the Gram does not fit: Lanczos on F, its own plan
                use_gram = False
        if plan is None:
            plan = make_plan(n_rows if use_gram else None)
        on_plan(plan)
        report["memory_plan"] = plan.as_dict()
    lanczos_kw: dict[str, Any] = {} if plan is None else {
        "max_basis": plan.max_basis, "basis_dtype": plan.basis_dtype}

    names = list(layers)
    layer_tops: dict[str, GramEigenpairs] = {}
    eigenvalues = gram_top = None
    stage("top_k")
    if use_gram:
        assert isinstance(op, RowFisher)
        gram_top, eigenvalues, layer_tops = _gram_spectrum(
            op, {n: groups[n] for n in names}, top_k, tol, seed, dense_block_max, density)
        report["spectrum"] = {"method": gram_top.method, "rows": n_rows}
        residuals = lifted_residuals(op, op, gram_top)
        # the top vectors stay in the Gram's coordinates (gram_top.dual): never (P, k)
        top = Eigenpairs(values=gram_top.values,
                         vectors=torch.empty(0, len(residuals), dtype=op.dtype),
                         residuals=residuals, converged=bool((residuals <= tol).all()),
                         steps=gram_top.steps + len(residuals), tol=tol,
                         smallest_ritz=float(eigenvalues[0]) if eigenvalues is not None
                         else float("nan"))
    else:
        report["spectrum"] = {"method": "lanczos (products with F)"}
        min_steps = (slq_steps if density else 0) if plan is None else plan.min_steps
        top = lanczos_topk(op, k=top_k, tol=tol, seed=seed, min_steps=min_steps, **lanczos_kw)
    report["top_eigenvalues"] = top.values.tolist()
    report["top_residuals"] = top.residuals.tolist()
    report["top_converged"] = top.converged
    report["lanczos_steps"] = top.steps
    rank_bound = op.rank_bound
    lam_min = 0.0 if rank_bound < op.dim else None
    report["condition_number"] = {
        "value": condition_number(top, damping, lam_min), "damping": damping,
        "lambda_min": 0.0 if lam_min == 0.0 else top.smallest_ritz,
        "note": (f"rank(F) <= {rank_bound} < P, so lambda_min = 0" if lam_min == 0.0 else
                 "lambda_min = smallest Ritz value (upper bound): condition is a lower bound"),
    }
    # the overlaps with the approximations' top eigenvectors now: the (P, k) vectors are not
    # kept through the later stages
    overlaps = {}
    for key, K in approx_ops.items():
        # eigenvectors vec(q_G q_Aᵀ) of the blocks in closed form; Lanczos when not available
        pairs = kfac_top_eigenpairs(K, top_k)
        kvectors = pairs[1] if pairs is not None else lanczos_topk(
            K, k=top_k, tol=tol, seed=seed, **lanczos_kw).vectors
        overlaps[key] = (subspace_overlap(top.vectors, kvectors) if gram_top is None else
                         lifted_overlap(op, gram_top, kvectors))
        del kvectors, pairs
    top = replace(top, vectors=top.vectors.new_empty(0, top.vectors.shape[1]))
    done("top_k")

    if density:
        stage("density")
        runs = []
        if eigenvalues is not None:  # the whole spectrum: exact, no probes
            quad = exact_quadrature(eigenvalues, op.dim)
        else:
            # the top-k run started from a Gaussian vector: an unbiased SLQ probe when long
            reuse = top.alpha is not None and top.alpha.numel() >= min(slq_steps, op.dim)
            runs = [(top.alpha, top.beta)] if reuse else []
            slq_kw: dict[str, Any] = {"max_basis_bytes": cache_bytes} if plan is None else {
                "batch": plan.slq_batch, "reorthogonalize": plan.slq_reorthogonalize}
            quad = quadrature(op, probes=probes, steps=slq_steps, seed=seed + 1, runs=runs,
                              **slq_kw)
        dens = spectral_density(quad=quad, num_points=400, log_grid=True)
        report["logdet"] = _est(slq_logdet(quad=quad, damping=damping))
        report["effective_dimension"] = _est(effective_dimension(quad=quad, z=damping))
        report["density"] = {"grid": dens.grid.tolist(), "density": dens.density.tolist(),
                             "sigma_log10": dens.sigma, "grid_scale": "log10",
                             "nodes": quad.nodes.tolist(), "weights": quad.weights.tolist(),
                             "probes": 0 if quad.exact else probes,
                             "steps": 0 if quad.exact else slq_steps,
                             "probes_from_top_k_run": len(runs), "exact": quad.exact}
        done("density")
    else:
        report["logdet"] = report["effective_dimension"] = None

    stage("approximation")
    # one probe at a time (its products, the blocks' and every approximation's errors), so
    # that a handful of vectors of P are alive whatever the number of probes
    gen = torch.Generator().manual_seed(seed + 2)
    per_probe: dict[Any, list[float]] = {}
    for _ in range(probes):
        bp = block_products(op, [groups[n] for n in names],
                            V=gaussian_probes(op, 1, generator=gen))
        values = {"coupling": coupling_strength(bp)}
        for key, K in approx_ops.items():
            # K is block diagonal over these layers: its product on the whole probe holds
            # every block's product on the masked probe
            KV = K @ bp.V.to(K.dtype)
            values[key] = relative_error(op, K, V=bp.V, FV=bp.FV, AV=KV)
            values.update({(b, key): block_relative_error(op, bp, b, K, AV=KV)
                           for b in range(len(names))})
            del KV
        del bp
        for what, est in values.items():
            per_probe.setdefault(what, []).append(est.value)
    estimates = {what: estimate(torch.tensor(v, dtype=torch.float64))
                 for what, v in per_probe.items()}
    report["coupling"] = _est(estimates["coupling"])
    approx_report: dict[str, Any] = {}
    for key, K in approx_ops.items():
        approx_report[key] = {
            "relative_error": _est(estimates[key]),
            "top_eigenvalues_closed_form": kfac_top_eigenvalues(K, top_k).tolist(),
            "trace_closed_form": kfac_trace(K),
            "logdet_closed_form": kfac_logdet(K, damping),
            "top_k_overlap": overlaps[key],
            "uncovered_parameters": K.uncovered,
        }
    report["approximations"] = approx_report
    block_errors = {(b, key): estimates[b, key]
                    for b in range(len(names)) for key in approx_ops}
    done("approximation")

    stage("layers")
    if isinstance(op, GGNOperator):
        op.clear_cache()  # the full operator is not multiplied again
    rows = []
    for b, name in enumerate(names):
        blk = op.block(name)
        k = min(top_k, blk.dim)
        if name in layer_tops:
            pairs = layer_tops[name]
            assert isinstance(blk, RowFisher)
            values, residuals, method = pairs.values, lifted_residuals(blk, blk, pairs), \
                pairs.method
            all_converged &= bool((residuals <= tol).all())
        elif blk.dim <= dense_block_max:
            values, residuals, method = _dense_top(blk, k)
        else:
            lt = lanczos_topk(blk, k=k, tol=tol, seed=seed, **lanczos_kw)
            values, residuals, method = lt.values, lt.residuals, f"lanczos ({lt.steps} products)"
            all_converged &= lt.converged
        blk_dim = blk.dim
        del blk  # frees its cached forward passes
        row = {"name": name, "kind": layers[name].kind, "params": blk_dim,
               "trace": layer_trace[name],
               "top_eigenvalue": float(values[0]),
               "top_eigenvalues": values.tolist(), "top_residuals": residuals.tolist(),
               "eigen_method": method}
        for key, K in approx_ops.items():
            err = block_errors[b, key]
            row[f"{key}_relative_error"] = err.value
            row[f"{key}_relative_error_stderr"] = err.stderr
            block = K.blocks[name]
            row[f"{key}_top_eigenvalues"] = block.top_eigenvalues(k).tolist()
            row[f"{key}_trace"] = block.trace()
        rows.append(row)
    report["layers"] = rows
    done("layers")
    report["timings_s"] = timings
    report["all_converged"] = bool(top.converged and all_converged)
    if not math.isfinite(report["condition_number"]["value"]):
        report["condition_number"]["value"] = None
    return report
