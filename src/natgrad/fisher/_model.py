"""Model and data plumbing shared by the operators: parameter selection here; the determinism
check and the chunked iteration over data come from the curvature's data capture
(:mod:`natgrad.curvature.data`), which also defines how a structured batch is sliced, moved and
passed to the model, so the operators and the optimizer read data alike."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..curvature.data import Data, check_deterministic, count_samples, iter_chunks

__all__ = ["Data", "check_deterministic", "count_samples", "iter_chunks", "select_params"]


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
