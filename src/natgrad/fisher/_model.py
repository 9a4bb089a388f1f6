"""Model and data plumbing shared by the operators: parameter selection here; the determinism
check and the chunked iteration over data come from the curvature's data capture
(:mod:`natgrad.curvature.data`), which also defines how a structured batch is sliced, moved and
passed to the model, so the operators and the optimizer read data alike."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..curvature.data import Data, check_deterministic, count_samples, iter_chunks

__all__ = ["Data", "check_deterministic", "constant_padding_rows", "count_samples", "iter_chunks",
           "padding_embeddings", "select_params"]


def select_params(
    model: nn.Module, params: Sequence[Tensor] | Sequence[str] | None = None
) -> list[tuple[str, Tensor]]:
    """``(name, parameter)`` pairs in ``named_parameters`` order.

    Args:
        params: ``None`` (every parameter with ``requires_grad``), parameter tensors, or names
            (a module name selects all its parameters).
    """
    named = [(n, p) for n, p in model.named_parameters()]
    if params is None:
        out = [(n, p) for n, p in named if p.requires_grad]
    elif all(isinstance(p, str) for p in params):
        out = [(n, p) for n, p in named
               if any(n == q or n.startswith(q + ".") for q in params)]  # type: ignore[operator]
    else:
        ids = {id(p) for p in params}
        out = [(n, p) for n, p in named if id(p) in ids]
    if not out:
        raise ValueError("no parameters selected")
    return out


def padding_embeddings(model: nn.Module) -> list[nn.Embedding]:
    """The model's ``nn.Embedding`` modules with a ``padding_idx``."""
    return [m for m in model.modules()
            if isinstance(m, nn.Embedding) and m.padding_idx is not None]


def _detach_padding(module: nn.Embedding, args: tuple[Any, ...], kwargs: dict[str, Any],
                    out: Tensor) -> Tensor:
    """Forward hook: the output ``(..., D)`` with the positions whose id (``input (...)``) is
    ``padding_idx`` detached from the weight (same values)."""
    ids = args[0] if args else kwargs["input"]
    pad = (ids == module.padding_idx).unsqueeze(-1)
    return torch.where(pad, out.detach(), out)


@contextmanager
def constant_padding_rows(modules: Sequence[nn.Embedding]) -> Iterator[None]:
    """Within the block, the padding row of each ``nn.Embedding`` in ``modules`` is a constant
    for forward- and reverse-mode AD alike.

    PyTorch's embedding backward gives the padding row no gradient, but its forward-mode
    derivative (``torch.func.jvp`` / ``linearize``) reads the row's tangent: ``J v`` would move
    the padding row while ``Jᵀ u`` never does, and a ``jvp`` + ``vjp`` product would not be
    symmetric. The outputs at padding positions are detached instead (a forward hook; values
    unchanged), which is what the backward computes, and a weight tied to another use (an
    output head) keeps that use's derivative.
    """
    with ExitStack() as stack:
        for m in modules:
            stack.callback(m.register_forward_hook(_detach_padding, with_kwargs=True).remove)
        yield
