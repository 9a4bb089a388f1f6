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
from .pullback import ChunkPullback, called_once


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


def recognised_layers(op: Any) -> dict[str, LayerSlot]:
    """The Linear / Conv2d layers (:func:`natgrad.layers.helper_for`) of a
    :class:`~natgrad.fisher.ggn.GGNOperator` whose parameters the operator all acts on, that
    run once per forward pass and share no parameter with another layer; their blocks get the
    pulled-back formulas, every other parameter the generic per-sample path."""
    index = {n: i for i, n in enumerate(op.names)}
    names = {id(p): n for n, p in op.model.named_parameters()}
    slots: dict[str, LayerSlot] = {}
    for name, module in op.model.named_modules():
        helper, _ = helper_for(module)
        if helper is None or not helper.per_sample_rows:
            continue
        pnames = [names.get(id(p)) for p in helper.params]
        if all(n in index for n in pnames):
            slots[name] = LayerSlot(helper, tuple(index[n] for n in pnames))
    claimed = [i for s in slots.values() for i in s.indices]
    shared = {i for i in claimed if claimed.count(i) > 1}
    slots = {n: s for n, s in slots.items() if not shared.intersection(s.indices)}
    if slots:
        x, _ = next(op.chunks(chunk_size=1))
        once = called_once(op.forward, {n: s.helper.module for n, s in slots.items()}, x)
        slots = {n: s for n, s in slots.items() if n in once}
    return slots


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
    (one forward and ``R`` backward passes per chunk to their outputs); ``0.0`` for a layer the
    outputs do not depend on."""
    sums = layer_trace_sums(op.pullbacks({n: h.module for n, h in layers.items()}), layers,
                            memory_elements)
    return {n: float(sums[n]) / op.num_samples if n in sums else 0.0 for n in layers}
