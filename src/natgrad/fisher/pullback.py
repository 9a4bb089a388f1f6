"""Pull the output-space factor ``B_n`` back to the outputs of the recognised layers.

For a chunk of ``m`` samples with network outputs ``f (m, C)`` and output factor ``B (m, R, C)``
(the likelihood's Hessian square root for the exact Fisher, sampled or data-label gradients for
the Monte-Carlo and empirical ones), row ``r`` pulled back to a layer output ``s (m, ...)`` is

    ``g_r = ∂(Σ_n (B_n f_n)_r) / ∂s``,  shape ``(m, ...)`` (the shape of ``s``),

i.e. ``J_{s,n}ᵀ B_nᵀ e_r`` for every sample at once (samples do not interact in an eval-mode
network). With the layer's input rows ``ā`` these give every per-sample, per-row parameter
gradient of the layer, ``Σ_t g_{r,t} ā_tᵀ``, without ever forming it for all parameters
(:mod:`natgrad.fisher.layer_diagonal`).

Two ways to run the ``R`` backward passes, both from one forward pass:

* :func:`pullback_rows` — a loop over ``r`` that reuses the graph (``retain_graph``): one row of
  gradients alive at a time. The default: measured on CPU (torch 2.13, 2 threads) it is 1.4–1.6×
  faster than the vmapped backward for both an MLP and a CNN, and needs ``R`` times less memory
  (see docs/DISCUSSION.md, "Batched pull-back").
* :func:`pullback` — all ``R`` rows in one vmapped backward (``is_grads_batched``), ``(R, m, ...)``
  per layer, falling back to the loop when a batching rule is missing.

Layer outputs are referenced by their autograd edge (``torch.autograd.graph.get_gradient_edge``)
so later in-place operations (``ReLU(inplace=True)``) cannot redirect the gradient, and no copy
of the output is needed; an output that does not require grad (a first layer whose parameters
are held fixed) is made a leaf and handed on as a copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

Rows = Iterator[dict[str, Tensor]]


def pullback_rows(outputs: Tensor, layer_outputs: Sequence[Any], B: Tensor) -> Iterator[
        list[Tensor | None]]:
    """Row by row: for ``r = 0..R−1`` the gradients ``g_r`` at each of ``layer_outputs``.

    Args:
        outputs: network outputs ``(m, C)`` (flattened per sample), part of the graph.
        layer_outputs: tensors or gradient edges of the layer outputs ``s_ℓ (m, ...)``.
        B: output factor ``(m, R, C)`` (no gradient).

    Yields:
        ``R`` lists, one entry per layer output: ``(m, ...)`` or ``None`` when ``outputs`` does
        not depend on it. The graph is freed after the last row.
    """
    R = B.shape[1]
    for r in range(R):
        yield list(torch.autograd.grad(outputs, list(layer_outputs), B[:, r, :],
                                       retain_graph=r < R - 1, allow_unused=True))


def pullback(outputs: Tensor, layer_outputs: Sequence[Any], B: Tensor) -> list[Tensor | None]:
    """All rows in one vmapped backward: per layer output ``(R, m, ...)`` (``None`` if unused).

    Same arguments as :func:`pullback_rows`; falls back to its loop (stacking the rows) when a
    module in the graph has no batching rule. Memory ``R ×`` the layer outputs.
    """
    try:
        grads = torch.autograd.grad(outputs, list(layer_outputs), B.transpose(0, 1),
                                    retain_graph=True, allow_unused=True,
                                    is_grads_batched=True)
    except RuntimeError:  # no batching rule for some op: one backward per row
        rows = list(pullback_rows(outputs, layer_outputs, B))
        return [None if g[0] is None else torch.stack(g) for g in zip(*rows)]
    return list(grads)


@dataclass
class ChunkPullback:
    """One chunk's forward pass, seen from the recognised layers.

    Attributes:
        m: samples in the chunk.
        inputs: layer name → the layer's input ``(m, ...)`` (detached).
        shapes: layer name → the shape of its output ``(m, ...)``.
        rows: iterator over the ``R`` rows of ``B``: layer name → ``g_r (m, ...)``; consume it
            before advancing to the next chunk (the graph is freed after the last row).
    """

    m: int
    inputs: dict[str, Tensor]
    shapes: dict[str, torch.Size]
    rows: Rows


class LayerTap:
    """Forward hooks that record each layer's input and the autograd edge of its output
    (and how often each layer ran)."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.inputs: dict[str, Tensor] = {}
        self.edges: dict[str, Any] = {}
        self.shapes: dict[str, torch.Size] = {}
        self.calls: dict[str, int] = {}
        self._handles: list[Any] = []

    def _hook(self, name: str) -> Callable:
        def fn(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
            self.calls[name] = self.calls.get(name, 0) + 1
            self.inputs[name] = inputs[0].detach()
            self.shapes[name] = output.shape
            if output.requires_grad:
                self.edges[name] = get_gradient_edge(output)
                return None
            leaf = output.detach().requires_grad_(True)
            self.edges[name] = get_gradient_edge(leaf)
            return leaf.clone()  # in-place ops downstream act on a copy, not on the leaf
        return fn

    def __enter__(self) -> LayerTap:
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def clear(self) -> None:
        self.inputs, self.edges, self.shapes, self.calls = {}, {}, {}, {}


def probe(forward: Callable[[Tensor], Tensor], modules: dict[str, nn.Module], x: Tensor
          ) -> tuple[Tensor, dict[str, int], dict[str, torch.Size]]:
    """``forward(x)`` without gradients, recording the modules: ``(outputs, how often each module
    ran, the shape of its last output)``."""
    with LayerTap(modules) as tap, torch.no_grad():
        out = forward(x)
    return out, dict(tap.calls), dict(tap.shapes)


def called_once(forward: Callable[[Tensor], Tensor], modules: dict[str, nn.Module],
                x: Tensor) -> set[str]:
    """The names of ``modules`` that run exactly once in ``forward(x)`` (a probe on a few samples):
    a module applied twice (weight sharing) has no single input/output pair to pull back to."""
    return {n for n, c in probe(forward, modules, x)[1].items() if c == 1}


def layer_pullbacks(
    forward: Callable[[Tensor], Tensor],
    modules: dict[str, nn.Module],
    chunks: Iterable[tuple[Tensor, Tensor | None]],
    output_factor: Callable[[Tensor, Tensor | None, int], Tensor],
) -> Iterator[ChunkPullback]:
    """One forward pass per chunk and the rows of ``B`` pulled back to the modules' outputs.

    Args:
        forward: ``x ↦ f(x)``, outputs ``(m, C)``; it must call the modules (hooks record them).
            Parameters need not require grad: the graph starts at the first recorded output.
        modules: layer name → module (a Linear / Conv2d with a helper).
        chunks: ``(x, y)`` pairs, ``x`` on the right device and dtype.
        output_factor: ``(outputs (m, C), y, chunk index) ↦ B (m, R, C)``.

    Yields:
        A :class:`ChunkPullback` per chunk; layers whose output does not influence ``f`` are
        left out of its rows.
    """
    with LayerTap(modules) as tap:
        for i, (x, y) in enumerate(chunks):
            tap.clear()
            with torch.enable_grad():
                out = forward(x)
            B = output_factor(out.detach(), y, i)
            names = list(tap.edges)
            if not names or not out.requires_grad:
                continue
            edges = [tap.edges[n] for n in names]

            def rows(out: Tensor = out, edges: list = edges, B: Tensor = B,
                     names: list[str] = names) -> Rows:
                for grads in pullback_rows(out, edges, B):
                    yield {n: g for n, g in zip(names, grads) if g is not None}

            yield ChunkPullback(out.shape[0], dict(tap.inputs), dict(tap.shapes), rows())
