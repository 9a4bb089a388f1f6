"""The table of factor strategies, chosen by name (``KFAC(factors=...)``, the analysis, benches).

A strategy is a :class:`~natgrad.factors.base.KroneckerFactor` subclass with a ``name``;
:func:`register_strategy` makes it available everywhere a strategy name is accepted, the CLI's
and the benches' lists included. Nothing else has to change to add one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from .base import KroneckerFactor
from .options import FactorOptions


class _Strategies(Mapping):
    """Name → strategy class, in registration order (a read-only view; use the functions)."""

    def __init__(self) -> None:
        self._table: dict[str, type[KroneckerFactor]] = {}

    def __getitem__(self, name: str) -> type[KroneckerFactor]:
        return self._table[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)

    def __repr__(self) -> str:
        return f"STRATEGIES({', '.join(self._table)})"


#: every registered strategy: name → class
STRATEGIES = _Strategies()


def register_strategy(cls: type[KroneckerFactor], *, replace: bool = False
                      ) -> type[KroneckerFactor]:
    """Register a strategy class under ``cls.name`` (usable as a class decorator).

    Raises ``ValueError`` if the class is not a :class:`KroneckerFactor` with a ``name`` and an
    ``Options`` dataclass, or if the name is taken (unless ``replace``).
    """
    if not (isinstance(cls, type) and issubclass(cls, KroneckerFactor)):
        raise ValueError(f"register_strategy expects a KroneckerFactor subclass, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute `name`")
    if not (isinstance(cls.Options, type) and issubclass(cls.Options, FactorOptions)):
        raise ValueError(f"{cls.__name__}.Options must be a FactorOptions dataclass")
    if name in STRATEGIES._table and not replace and STRATEGIES._table[name] is not cls:
        raise ValueError(f"a factor strategy named {name!r} is already registered "
                         f"({STRATEGIES._table[name].__name__}); pass replace=True")
    STRATEGIES._table[name] = cls
    return cls


def unregister_strategy(name: str) -> None:
    """Remove a registered strategy (``ValueError`` if there is none of that name)."""
    get_strategy(name)
    del STRATEGIES._table[name]


def get_strategy(name: str) -> type[KroneckerFactor]:
    """The strategy class of ``name``; ``ValueError`` listing the accepted names otherwise."""
    try:
        return STRATEGIES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"factors={name!r} is not a known strategy; accepted values: {sorted(STRATEGIES)}"
        ) from None


def strategy_options(name: str, options: FactorOptions | dict[str, Any] | None = None
                     ) -> FactorOptions:
    """The validated options of strategy ``name`` (defaults for ``None``)."""
    return get_strategy(name).Options.coerce(options)


def make_factor(
    strategy: str,
    dim: int,
    options: FactorOptions | dict[str, Any] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    **option_kwargs: Any,
) -> KroneckerFactor:
    """A new ``dim × dim`` factor of the named strategy (``ValueError`` listing the accepted
    names, or naming a bad option)."""
    cls = get_strategy(strategy)
    opts = cls.Options.coerce(options, **option_kwargs)
    return cls.create(dim, opts, dtype=dtype, device=device)
