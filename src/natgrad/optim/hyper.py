"""Hyperparameter validation and schedules: every value may be a constant or a callable of the
step (``int -> value``). Errors name the hyperparameter and the accepted range, and are raised
before any optimizer state changes."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

Schedule = Any  # a value or a callable ``step -> value``


def resolve(name: str, value: Schedule, step: int) -> Any:
    """The value of ``name`` at ``step`` (calls it when callable), validated."""
    v = value(step) if callable(value) else value
    check(name, v)
    return v


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": (lambda v: _is_real(v) and v > 0, "a finite number > 0"),
    "momentum": (lambda v: _is_real(v) and 0 <= v < 1, "a number in [0, 1)"),
    "weight_decay": (lambda v: _is_real(v) and v >= 0, "a finite number >= 0"),
    "damping": (lambda v: _is_real(v) and v > 0, "a finite number > 0"),
    "factor_decay": (lambda v: _is_real(v) and 0 <= v < 1, "a number in [0, 1)"),
    "curvature_every": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                        "an integer >= 1"),
    "inverse_every": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                      "an integer >= 1"),
    "kl_clip": (lambda v: v is None or (_is_real(v) and v > 0), "None or a finite number > 0"),
}


def check(name: str, value: Any) -> None:
    """``ValueError`` naming ``name``, the value and the accepted range when ``value`` is invalid.

    Callables are accepted here and checked each time they are evaluated.
    """
    if callable(value):
        return
    ok, accepted = _RULES[name]
    if not ok(value):
        raise ValueError(
            f"invalid {name}={value!r}: expected {accepted} (or a callable of the step)"
        )
