"""Inner products and finiteness checks over lists of tensors, with one device sync at most.

The optimizer checks gradients and curvature statistics, and the factor strategies track traces,
with the same few reductions; they live here so that every caller shares them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def dot(a: Tensor, b: Tensor) -> Tensor:
    """``⟨a, b⟩`` as a 0-dim tensor (no sync), for tensors of equal shape."""
    if a.is_contiguous() and b.is_contiguous():
        return torch.dot(a.reshape(-1), b.reshape(-1))
    return (a * b).sum()


def squared_norms(tensors: list[Tensor]) -> list[Tensor]:
    """``‖t‖²`` per tensor as 0-dim tensors (no sync); float32 or wider accumulation."""
    return [dot(t, t) if t.dtype in (torch.float32, torch.float64) else t.float().square().sum()
            for t in tensors]


def to_floats(values: list[Tensor]) -> list[float]:
    """0-dim tensors as Python floats, with one sync."""
    if not values:
        return []
    if len({v.dtype for v in values}) > 1:
        values = [v.double() for v in values]
    return torch.stack(values).tolist()


def finite_total(values: list[Tensor]) -> bool:
    """Whether the sum of 0-dim ``values`` is finite (one sync)."""
    return math.isfinite(sum(to_floats(values)))


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every entry of ``tensors`` is finite: one reduction per tensor, one sync.

    A sum of squares is non-finite iff an entry is (or it overflows, which only makes the check
    conservative)."""
    return finite_total(squared_norms(tensors))
