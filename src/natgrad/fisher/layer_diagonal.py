"""Exact diagonal and trace of a Fisher block per recognised layer, from pulled-back rows.

For a layer with input rows ``ā_{n,t}`` (``A_n``: ``(T, d_A)``, :meth:`LayerHelper.input_rows`)
and row ``r`` of the output factor pulled back to its output, ``g_{n,r,t}`` (``G_{n,r}``:
``(T, d_G)``, :meth:`LayerHelper.output_grad_rows` of :mod:`natgrad.fisher.pullback`'s
gradients), the per-sample, per-row gradient of ``V = [W | b]`` is ``G_{n,r}ᵀ A_n`` ``(d_G, d_A)``,
so the layer's block of ``F = (1/N) Σ_n Σ_r (B_n J_n)_rᵀ (B_n J_n)_r`` has

* diagonal ``(1/N) Σ_n Σ_r (G_{n,r}ᵀ A_n)²`` (elementwise square), and
* trace ``(1/N) Σ_n Σ_r ‖G_{n,r}ᵀ A_n‖_F²``.

``T = 1`` (Linear without extra leading dims): ``(G_{n,r}ᵀ A_n)² = (g_{n,r}²)(ā_n²)ᵀ``, so the
diagonal of a chunk is one matmul ``(Σ_r G_r²)ᵀ (A²)`` and the trace ``Σ_n Σ_r ‖g_{n,r}‖² ‖ā_n‖²``.
``T > 1`` (Conv2d): per-sample gradients by a batched matmul, in sub-chunks of at most
``memory_elements`` elements; the trace takes the Gram form ``Σ_{t,t'} (g_t·g_t')(ā_t·ā_t')``
when it is cheaper.

The functions here return *sums* over the samples (divide by ``N``); the diagonal is laid out as
the ``(d_G, d_A)`` matrix ``[W | b]`` (:meth:`LayerHelper.split_matrix` gives the parameters).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..layers import LayerHelper, helper_for
from .pullback import ChunkPullback, LayerTap, called_once


def input_matrix(helper: LayerHelper, inputs: Tensor) -> Tensor:
    """``A``: ``(m, T, d_A)`` from the layer input ``(m, ...)``."""
    return helper.input_rows(inputs).reshape(inputs.shape[0], -1, helper.in_dim)


def grad_matrix(helper: LayerHelper, grad: Tensor) -> Tensor:
    """``G``: ``(m, T, d_G)`` from the gradient at the layer output ``(m, ...)``."""
    return helper.output_grad_matrix(grad)


def per_sample_sq_norms(G: Tensor, A: Tensor, memory_elements: int = 1 << 24) -> Tensor:
    """``Σ_n ‖G_nᵀ A_n‖_F²`` for ``G (m, T, d_G)``, ``A (m, T, d_A)`` (float64 scalar)."""
    if G.shape[1] == 1:
        return (G.double().pow(2).sum((1, 2)) * A.double().pow(2).sum((1, 2))).sum()
    m, T, dg = G.shape
    da = A.shape[2]
    total = torch.zeros((), dtype=torch.float64, device=G.device)
    if T * T * (dg + da) < T * dg * da:  # Gram form: Σ_tt' (g_t·g_t')(a_t·a_t')
        sub = max(1, memory_elements // (T * T))
        for s in range(0, m, sub):
            gg = G[s:s + sub] @ G[s:s + sub].transpose(1, 2)
            aa = A[s:s + sub] @ A[s:s + sub].transpose(1, 2)
            total += (gg.double() * aa.double()).sum()
        return total
    sub = max(1, memory_elements // (dg * da))
    for s in range(0, m, sub):
        total += (G[s:s + sub].transpose(1, 2) @ A[s:s + sub]).double().pow(2).sum()
    return total


def per_sample_sq_sum(G: Tensor, A: Tensor, memory_elements: int = 1 << 24) -> Tensor:
    """``Σ_n (G_nᵀ A_n)²`` (elementwise), ``(d_G, d_A)``, for ``G (m, T, d_G)``, ``A (m, T, d_A)``.

    ``T = 1``: one matmul ``(G²)ᵀ (A²)``; otherwise per-sample gradients by a batched matmul in
    sub-chunks of at most ``memory_elements`` elements."""
    m, T, dg = G.shape
    da = A.shape[2]
    if T == 1:
        return G[:, 0].pow(2).T @ A[:, 0].pow(2)
    out = G.new_zeros(dg, da)
    sub = max(1, memory_elements // (dg * da))
    for s in range(0, m, sub):
        out += (G[s:s + sub].transpose(1, 2) @ A[s:s + sub]).pow(2).sum(0)
    return out


def _chunk_sums(chunk: ChunkPullback, helpers: dict[str, LayerHelper],
                per_row: Callable[[Tensor, Tensor], Tensor],
                summed_rows: Callable[[Tensor, Tensor], Tensor]) -> dict[str, Tensor]:
    """Per layer of one chunk: ``Σ_r per_row(G_r, A)`` for ``T > 1``, and for ``T = 1``
    ``summed_rows(Σ_r G_r², A)`` (``Σ_r G_r²`` accumulated row by row, ``(m, 1, d_G)``). Consumes
    the chunk's rows, one row of gradients alive at a time."""
    A = {n: input_matrix(helpers[n], a) for n, a in chunk.inputs.items() if n in helpers}
    sums: dict[str, Tensor] = {}
    squares: dict[str, Tensor] = {}
    for grads in chunk.rows:
        for n, g in grads.items():
            if n not in A:
                continue
            Gr = grad_matrix(helpers[n], g)
            if Gr.shape[1] == 1:
                if n in squares:
                    squares[n] += Gr.pow(2)
                else:
                    squares[n] = Gr.pow(2)
            else:
                part = per_row(Gr, A[n]).double()
                sums[n] = sums[n] + part if n in sums else part
    for n, S in squares.items():
        sums[n] = summed_rows(S, A[n]).double()
    return sums


def _accumulate(chunks: Iterable[ChunkPullback], helpers: dict[str, LayerHelper],
                per_row: Callable[[Tensor, Tensor], Tensor],
                summed_rows: Callable[[Tensor, Tensor], Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for chunk in chunks:
        for n, part in _chunk_sums(chunk, helpers, per_row, summed_rows).items():
            out[n] = out[n] + part if n in out else part
    return out


def layer_diagonals(chunks: Iterable[ChunkPullback], helpers: dict[str, LayerHelper],
                    memory_elements: int = 1 << 24) -> dict[str, Tensor]:
    """Per layer ``Σ_n Σ_r (G_{n,r}ᵀ A_n)²`` as a ``(d_G, d_A)`` float64 matrix (a sum over the
    samples: divide by ``N``); layers that never influence the outputs are absent."""
    return _accumulate(
        chunks, helpers, lambda G, A: per_sample_sq_sum(G, A, memory_elements),
        lambda S, A: S[:, 0].T @ A[:, 0].pow(2))


def layer_trace_sums(chunks: Iterable[ChunkPullback], helpers: dict[str, LayerHelper],
                     memory_elements: int = 1 << 24) -> dict[str, Tensor]:
    """Per layer ``Σ_n Σ_r ‖G_{n,r}ᵀ A_n‖_F²`` (float64 scalar; a sum over the samples);
    layers that never influence the outputs are absent."""
    return _accumulate(
        chunks, helpers, lambda G, A: per_sample_sq_norms(G, A, memory_elements),
        lambda S, A: (S.double().sum((1, 2)) * A.double().pow(2).sum((1, 2))).sum())


# ---------------------------------------------------------------------- operators
@dataclass(frozen=True)
class LayerSlot:
    """A recognised layer of an operator: its helper and the indices (into ``op.names``) of its
    parameters, in the helper's order (weight, then bias)."""

    helper: LayerHelper
    indices: tuple[int, ...]


def recognised_layers(op: Any, reasons: dict[str, str] | None = None) -> dict[str, LayerSlot]:
    """The layers with per-sample rows (:attr:`LayerHelper.per_sample_rows`, e.g. Linear /
    Conv2d) of a :class:`~natgrad.fisher.ggn.GGNOperator` whose blocks get the pulled-back
    formulas; every other parameter takes the generic per-sample path (every use of a parameter
    counted, as the model computes it).

    A layer is recognised when the operator acts on all its parameters and the formula
    ``∇θ = Σ_t g_t ā_tᵀ`` of its own input and output gradient is the parameter's whole gradient:

    * no parameter is shared with another module (tied weights such as GPT-2's ``lm_head`` and
      ``wte``: the gradient is the sum over both uses, which the layer's rows cannot give);
    * the layer runs once per forward pass (a module called twice has no single input/output);
    * checked once numerically on two samples: the formula reproduces the autograd gradient of a
      random output direction (catches a parameter used again elsewhere, e.g. functionally).

    ``reasons``: filled with layer name → why a layer with a helper takes the generic path.
    """
    why: dict[str, str] = {} if reasons is None else reasons
    index = {n: i for i, n in enumerate(op.names)}
    names = {id(p): n for n, p in op.model.named_parameters()}
    holders: dict[int, int] = {}
    for module in op.model.modules():
        for p in module.parameters(recurse=False):
            holders[id(p)] = holders.get(id(p), 0) + 1
    slots: dict[str, LayerSlot] = {}
    for name, module in op.model.named_modules():
        helper, _ = helper_for(module)
        if helper is None or not helper.per_sample_rows:
            continue
        pnames = [names.get(id(p)) for p in helper.params]
        if not all(n in index for n in pnames):
            continue
        if any(holders.get(id(p), 0) > 1 for p in helper.params):
            why[name] = "shares a parameter with another module"
            continue
        slots[name] = LayerSlot(helper, tuple(index[n] for n in pnames))
    if slots:
        x, _ = next(op.chunks(chunk_size=1))
        once = called_once(op.forward, {n: s.helper.module for n, s in slots.items()}, x)
        for n in set(slots) - once:
            why[n] = "does not run exactly once per forward pass"
        slots = {n: s for n, s in slots.items() if n in once}
    if slots:
        x, _ = next(op.chunks(chunk_size=2))
        for n in _formula_fails(op, slots, x):
            why[n] = "its parameter gradient is not its rows' (a parameter used elsewhere)"
            del slots[n]
    return slots


def _formula_fails(op: Any, slots: dict[str, LayerSlot], x: Any) -> list[str]:
    """The layers whose parameter gradient, for a random output direction on ``x``, is not
    ``Σ_n G_nᵀ A_n`` of their recorded input and output gradient (relative tolerance
    ``10 √eps`` of the operator's dtype)."""
    pnames = [op.names[i] for s in slots.values() for i in s.indices]
    params = dict(op._params)
    params.update({n: params[n].detach().requires_grad_(True) for n in pnames})
    with LayerTap(_modules(slots)) as tap, torch.enable_grad():
        out = op._f(params, x)
    if not out.requires_grad:
        return []
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    tapped = [n for n in slots if n in tap.edges]
    grads = torch.autograd.grad(out, [params[n] for n in pnames] + [tap.edges[n] for n in tapped],
                                u, allow_unused=True)
    by_name = dict(zip(pnames, grads[:len(pnames)]))
    tol = 10 * torch.finfo(op.dtype).eps ** 0.5
    failed = []
    for n, g in zip(tapped, grads[len(pnames):]):
        h = slots[n].helper
        actual = [by_name[op.names[i]] for i in slots[n].indices]
        if g is None:
            if any(a is not None and bool(a.any()) for a in actual):
                failed.append(n)
            continue
        rows = torch.einsum("mtg,mta->ga", grad_matrix(h, g), input_matrix(h, tap.inputs[n]))
        full = h.grad_matrix([torch.zeros_like(params[op.names[i]]) if a is None else a
                              for a, i in zip(actual, slots[n].indices)])
        scale = max(float(full.norm()), float(rows.norm()), 1e-300)
        if float((rows - full).norm()) > tol * scale:
            failed.append(n)
    return failed


def _modules(slots: dict[str, LayerSlot]) -> dict[str, nn.Module]:
    return {n: s.helper.module for n, s in slots.items()}


def ggn_diagonal(op: Any, memory_elements: int = 1 << 24) -> Tensor:
    """The exact diagonal ``(P,)`` of a :class:`~natgrad.fisher.ggn.GGNOperator`: recognised
    layers from one forward and ``R`` backward passes per chunk to their outputs
    (:func:`layer_diagonals`), the other parameters from per-sample gradients
    (``op.sample_diagonal``)."""
    slots = recognised_layers(op)
    out = torch.zeros(op.dim, dtype=op.dtype, device=op.device)
    sums = layer_diagonals(op.pullbacks(_modules(slots)),
                           {n: s.helper for n, s in slots.items()}, memory_elements)
    for name, slot in slots.items():
        if name not in sums:  # the outputs do not depend on this layer
            continue
        for i, t in zip(slot.indices, slot.helper.split_matrix(sums[name] / op.num_samples)):
            out[op.offsets[i]:op.offsets[i + 1]] = t.reshape(-1).to(op.dtype)
    covered = {i for s in slots.values() for i in s.indices}
    rest = [n for i, n in enumerate(op.names) if i not in covered]
    if rest:
        sub = op.restrict(rest)
        d = sub.sample_diagonal(memory_elements)
        for j, n in enumerate(sub.names):
            i = op.names.index(n)
            out[op.offsets[i]:op.offsets[i + 1]] = d[sub.offsets[j]:sub.offsets[j + 1]]
    return out


def ggn_layer_traces(op: Any, layers: dict[str, LayerHelper],
                     memory_elements: int = 1 << 24) -> dict[str, float]:
    """Exact ``tr F_ℓℓ`` of a :class:`~natgrad.fisher.ggn.GGNOperator` for the named ``layers``
    (any helpers; ``0.0`` for a layer the outputs do not depend on). Layers the operator
    recognises (:func:`recognised_layers`) from one forward and ``R`` backward passes per chunk
    to their outputs; the others (normalization layers, tied or reused parameters) from
    per-sample gradients of their parameters only (``op.restrict(...).sample_diagonal``)."""
    slots = recognised_layers(op)
    fast = {n: h for n, h in layers.items() if n in slots and slots[n].helper.module is h.module}
    sums = layer_trace_sums(op.pullbacks({n: h.module for n, h in fast.items()}), fast,
                            memory_elements) if fast else {}
    out = {n: float(sums[n]) / op.num_samples if n in sums else 0.0 for n in fast}
    names = {id(p): n for n, p in op.model.named_parameters()}
    for n, h in layers.items():
        if n not in fast:
            sub = op.restrict([names[id(p)] for p in h.params])
            out[n] = float(sub.sample_diagonal(memory_elements).double().sum())
    return {n: out[n] for n in layers}
