"""Model and data plumbing shared by the operators: parameter selection, the determinism check,
and chunked iteration over ``(X, y)`` tensors or a ``DataLoader``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

_STOCHASTIC = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._NormBase)

Data = Iterable[Any] | tuple[Tensor, ...]


def check_deterministic(model: nn.Module) -> None:
    """``ValueError`` if ``model`` is in train mode and holds Dropout / BatchNorm modules.

    Their train-mode outputs are random or depend on the whole batch, so a Fisher defined per
    sample is not well defined; the user must choose ``model.eval()`` explicitly (we never call it).
    """
    bad = [f"{n or '<model>'} ({type(m).__name__})" for n, m in model.named_modules()
           if isinstance(m, _STOCHASTIC) and m.training]
    if bad:
        raise ValueError(
            "the model is in train mode and contains non-deterministic modules: "
            f"{', '.join(bad)}; call model.eval() before building a Fisher operator"
        )


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


def iter_chunks(data: Data, chunk_size: int) -> Iterator[tuple[Tensor, Tensor | None]]:
    """``(x, y)`` chunks of at most ``chunk_size`` samples (``y`` is ``None`` without labels).

    ``data`` is a tuple ``(X,)`` / ``(X, y)`` of tensors, a ``TensorDataset``, or any iterable of
    ``(x, y)`` batches (a ``DataLoader``; it must iterate in a fixed order for the Monte-Carlo
    operator to be one fixed matrix).
    """
    if isinstance(data, torch.utils.data.TensorDataset):
        data = tuple(data.tensors)
    if isinstance(data, tuple) and data and all(isinstance(t, Tensor) for t in data):
        X, y = data[0], (data[1] if len(data) > 1 else None)
        for s in range(0, X.shape[0], chunk_size):
            yield X[s:s + chunk_size], (y[s:s + chunk_size] if y is not None else None)
        return
    for batch in data:
        x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
        for s in range(0, x.shape[0], chunk_size):
            yield x[s:s + chunk_size], (y[s:s + chunk_size] if y is not None else None)


def count_samples(data: Data) -> int:
    """``N``: the number of samples in ``data`` (one pass over a loader)."""
    return sum(x.shape[0] for x, _ in iter_chunks(data, 1 << 30))
