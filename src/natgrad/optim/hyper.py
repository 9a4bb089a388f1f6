"""Hyperparameter validation and schedules: every value may be a constant or a callable of the
step (``int -> value``). Errors name the hyperparameter and the accepted range, and are raised
before any optimizer state changes.

Numbers may be Python numbers, NumPy scalars or one-element tensors (as ``torch.optim``
accepts them); they are read as Python numbers when a step uses them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

from torch import Tensor

Schedule = Any  # a value or a callable ``step -> value``


def as_number(value: Any) -> int | float | None:
    """``value`` as a Python ``int`` / ``float`` (NumPy scalars, one-element tensors), or
    ``None`` if it is no number (booleans are not numbers here)."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.requires_grad or value.dtype.is_complex:
            return None
        value = value.item()
    if isinstance(value, bool) or type(value).__name__ == "bool_":  # Python / NumPy booleans
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return None


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": (lambda v: _real(v) and v > 0, "a finite number > 0"),
    "momentum": (lambda v: _real(v) and 0 <= v < 1, "a number in [0, 1)"),
    "weight_decay": (lambda v: _real(v) and v >= 0, "a finite number >= 0"),
    "damping": (lambda v: _real(v) and v > 0, "a finite number > 0"),
    "factor_decay": (lambda v: _real(v) and 0 <= v < 1, "a number in [0, 1)"),
    "curvature_every": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "inverse_every": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "kl_clip": (lambda v: v is None or (_real(v) and v > 0), "None or a finite number > 0"),
}


def normalize(name: str, value: Any) -> Any:
    """``value`` as the Python number it stands for, or ``ValueError`` naming ``name``, the value
    and the accepted range. (``kl_clip`` may also be ``None``.)"""
    number = None if value is None and name == "kl_clip" else as_number(value)
    if value is not None and number is None:
        number = value  # not a number: the rule below rejects it
    ok, accepted = _RULES[name]
    if not ok(number):
        raise ValueError(
            f"invalid {name}={value!r}: expected {accepted} (or a callable of the step)"
        )
    return number


def check(name: str, value: Any) -> None:
    """``ValueError`` naming ``name``, the value and the accepted range when ``value`` is invalid.

    Callables are accepted here and checked each time they are evaluated.
    """
    if not callable(value):
        normalize(name, value)


def resolve(name: str, value: Schedule, step: int) -> Any:
    """The value of ``name`` at ``step`` (calls it when callable), validated, as a Python
    number."""
    return normalize(name, value(step) if callable(value) else value)


def adam_moments(owner: str, betas: Any, eps: Any) -> tuple[float, float]:
    """Adam's ``(β₁, β₂)`` as floats, after checking them and ``eps`` (each β a number in
    ``[0, 1)``, ε a finite number ``> 0``); the errors name ``owner``'s options (e.g.
    ``"graft"``, ``"eigen_adam"``)."""
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < 1
                       for x in betas)):
        raise ValueError(f"invalid {owner} betas={betas!r}: expected two numbers in [0, 1)")
    if (not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps)
            or eps <= 0):
        raise ValueError(f"invalid {owner} eps={eps!r}: expected a finite number > 0")
    return float(betas[0]), float(betas[1])
