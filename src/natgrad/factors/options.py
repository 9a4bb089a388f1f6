"""Typed strategy options: one frozen dataclass per factor strategy, validated once.

Every strategy declares its options type as ``KroneckerFactor.Options``; the optimizer, the
analysis, the benches and the registry all build factors through it, so there is one set of
defaults and one place that checks them. A plain ``dict`` (``factor_options={"rank": 16}``) is
still accepted everywhere and converted by :meth:`FactorOptions.coerce`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T", bound="FactorOptions")


@dataclasses.dataclass(frozen=True)
class FactorOptions:
    """Options of a strategy that has none (``eigh``, ``cholesky``); base of the others.

    Subclasses add fields with defaults and check them in ``__post_init__`` with the helpers
    below, raising ``ValueError`` that names the option and the accepted range.
    """

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def coerce(cls: type[T], value: Any = None, **overrides: Any) -> T:
        """``value`` as this options type: ``None`` (the defaults), a mapping of option names, or
        an instance; ``overrides`` are applied on top. Unknown names raise ``ValueError`` listing
        the accepted ones."""
        if isinstance(value, cls):
            base: dict[str, Any] = dataclasses.asdict(value)
        elif value is None:
            base = {}
        elif isinstance(value, Mapping):
            base = dict(value)
        else:
            raise ValueError(
                f"invalid factor_options={value!r}: expected None, a dict of keyword arguments "
                f"or a {cls.__name__}"
            )
        base.update(overrides)
        unknown = sorted(set(base) - set(cls.names()))
        if unknown:
            accepted = ", ".join(cls.names()) or "none"
            raise ValueError(f"unknown factor option(s) {', '.join(unknown)} for {cls.__name__}; "
                             f"accepted: {accepted}")
        return cls(**base)

    def as_dict(self) -> dict[str, Any]:
        """The options as plain keyword arguments."""
        return dataclasses.asdict(self)


def check_int(name: str, value: Any, low: int = 1) -> int:
    """``value`` as an ``int >= low`` or ``ValueError`` naming the option."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"invalid {name}={value!r}: expected an integer >= {low}")
    return int(value)


def check_optional_int(name: str, value: Any, low: int = 1) -> int | None:
    """``None`` or :func:`check_int`."""
    return None if value is None else check_int(name, value, low)


def check_real(name: str, value: Any, ok: Any, what: str) -> float:
    """``value`` as a finite ``float`` for which ``ok(value)`` holds, or ``ValueError`` naming
    the option and ``what`` it accepts (e.g. ``"a number in (0, 1]"``)."""
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or not ok(value)):
        raise ValueError(f"invalid {name}={value!r}: expected {what}")
    return float(value)


def check_choice(name: str, value: Any, accepted: tuple[str, ...]) -> str:
    """``value`` if it is one of ``accepted``, else ``ValueError`` listing them."""
    if value not in accepted:
        raise ValueError(f"invalid {name}={value!r}: accepted values: {list(accepted)}")
    return value
