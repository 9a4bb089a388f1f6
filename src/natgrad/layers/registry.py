"""The table of layer helpers: module type → :class:`~natgrad.layers.base.LayerHelper`.

A module is matched by ``isinstance`` through its class hierarchy, closest registered class
first, so subclasses of ``nn.Linear`` / ``nn.Conv2d`` (e.g. attention's ``out_proj``) are
recognised. Adding a layer type = one module with a helper and one :func:`register_layer` call.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from torch import nn

from .base import LayerHelper


class _Layers(Mapping):
    """Module type → helper class, in registration order (read-only; use the functions)."""

    def __init__(self) -> None:
        self._table: dict[type[nn.Module], type[LayerHelper]] = {}

    def __getitem__(self, key: type[nn.Module]) -> type[LayerHelper]:
        return self._table[key]

    def __iter__(self) -> Iterator[type[nn.Module]]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)

    def __repr__(self) -> str:
        return "HELPERS(" + ", ".join(f"{t.__name__}: {h.__name__}"
                                      for t, h in self._table.items()) + ")"


#: every registered layer type: module class → helper class
HELPERS = _Layers()


def register_layer(module_type: type[nn.Module], helper: type[LayerHelper], *,
                   replace: bool = False) -> type[LayerHelper]:
    """Precondition modules of ``module_type`` (and its subclasses) with ``helper``.

    Raises ``ValueError`` for a non-module type, a helper that is not a :class:`LayerHelper`, or
    a type that already has a helper (unless ``replace``).
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise ValueError(f"register_layer expects an nn.Module subclass, got {module_type!r}")
    if not (isinstance(helper, type) and issubclass(helper, LayerHelper)):
        raise ValueError(f"register_layer expects a LayerHelper subclass, got {helper!r}")
    current = HELPERS._table.get(module_type)
    if current is not None and current is not helper and not replace:
        raise ValueError(f"{module_type.__name__} already has the helper {current.__name__}; "
                         "pass replace=True")
    HELPERS._table[module_type] = helper
    return helper


def unregister_layer(module_type: type[nn.Module]) -> None:
    """Remove the helper registered for exactly ``module_type`` (``ValueError`` if none)."""
    if module_type not in HELPERS._table:
        raise ValueError(f"no layer helper is registered for {module_type!r}")
    del HELPERS._table[module_type]


def helper_class(module: nn.Module) -> type[LayerHelper] | None:
    """The helper registered for the closest class of ``module`` in its MRO, or ``None``."""
    for cls in type(module).__mro__:
        helper = HELPERS._table.get(cls)
        if helper is not None:
            return helper
    return None


def helper_for(module: nn.Module) -> tuple[LayerHelper | None, str | None]:
    """The helper for ``module`` and, when it cannot be preconditioned, the reason why.

    Returns ``(None, None)`` for module types without a helper (they hold no weights we
    precondition or are simply not known), ``(None, reason)`` for known but unsupported
    configurations.
    """
    cls = helper_class(module)
    if cls is None:
        return None, None
    reason = cls.unsupported_reason(module)
    if reason is not None:
        return None, reason
    return cls(module), None
