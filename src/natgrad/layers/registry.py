"""The table of layer helpers: module type → :class:`~natgrad.layers.base.LayerHelper`.

A key is one of

* a **class**: its modules and its subclasses' (closest registered class in the MRO first);
* a **qualified name** ``"package.module.Class"``: the same, matched by name without importing
  the package (``"transformers.pytorch_utils.Conv1D"``);
* a **name pattern** with ``*`` (``fnmatch``), e.g. ``"transformers.*RMSNorm"``: classes whose
  qualified name matches, when no class or name key does.

**A layer is matched by what it computes.** A module whose class is the registered one, or a
subclass that keeps its ``forward``, computes the helper's formula. A subclass with its own
``forward`` (timm's ``LayerNorm2d``, ``BatchNormAct2d``) and a class found by a name pattern are
only *candidates*: the helper checks, on the module's first recorded forward, that its output is
the helper's formula on that input (:meth:`LayerHelper.verify`) — or a variant the helper knows,
e.g. a channels-first LayerNorm or a normalization followed by an activation — and refuses the
layer otherwise (warning, registration summary). A wrong block is never used.

Adding a layer type = one module with a helper and one :func:`register_layer` call.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Mapping

from torch import nn

from .base import LayerHelper

Key = type[nn.Module] | str


def qualified_name(cls: type) -> str:
    """``"package.module.Class"`` of a class."""
    return f"{cls.__module__}.{cls.__qualname__}"


class _Layers(Mapping):
    """Key (class, qualified name or pattern) → helper class, in registration order (read-only;
    use the functions)."""

    def __init__(self) -> None:
        self._table: dict[Key, type[LayerHelper]] = {}

    def __getitem__(self, key: Key) -> type[LayerHelper]:
        return self._table[key]

    def __iter__(self) -> Iterator[Key]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)

    def __repr__(self) -> str:
        return "HELPERS(" + ", ".join(f"{getattr(t, '__name__', t)}: {h.__name__}"
                                      for t, h in self._table.items()) + ")"


#: every registered layer type: module class (or qualified name / pattern) → helper class
HELPERS = _Layers()


def register_layer(module_type: Key, helper: type[LayerHelper], *,
                   replace: bool = False) -> type[LayerHelper]:
    """Precondition modules of ``module_type`` (and its subclasses) with ``helper``.

    ``module_type`` may be a class, a qualified class name (matched without importing its
    package) or a pattern with ``*`` (candidates checked on their first forward; see the module
    docstring). Raises ``ValueError`` for anything else, a helper that is not a
    :class:`LayerHelper`, or a key that already has a helper (unless ``replace``).
    """
    if isinstance(module_type, str):
        if not module_type or "." not in module_type:
            raise ValueError(f"register_layer expects a qualified class name "
                             f"('package.module.Class') or pattern, got {module_type!r}")
    elif not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise ValueError(f"register_layer expects an nn.Module subclass, a qualified class name "
                         f"or a name pattern, got {module_type!r}")
    if not (isinstance(helper, type) and issubclass(helper, LayerHelper)):
        raise ValueError(f"register_layer expects a LayerHelper subclass, got {helper!r}")
    current = HELPERS._table.get(module_type)
    if current is not None and current is not helper and not replace:
        name = getattr(module_type, "__name__", module_type)
        raise ValueError(f"{name} already has the helper {current.__name__}; pass replace=True")
    HELPERS._table[module_type] = helper
    return helper


def unregister_layer(module_type: Key) -> None:
    """Remove the helper registered for exactly ``module_type`` (``ValueError`` if none)."""
    if module_type not in HELPERS._table:
        raise ValueError(f"no layer helper is registered for {module_type!r}")
    del HELPERS._table[module_type]


def match(module: nn.Module) -> tuple[type[LayerHelper] | None, str | None]:
    """``(helper class, why the module must be verified)`` for ``module``.

    The second entry is ``None`` when the module computes the helper's formula by construction
    (its class, or a subclass keeping its ``forward``, is registered), else the reason it is only
    a candidate (see the module docstring). ``(None, None)``: no helper.
    """
    cls = type(module)
    for base in cls.__mro__:
        helper = HELPERS._table.get(base) or HELPERS._table.get(qualified_name(base))
        if helper is None:
            continue
        if cls is base or getattr(cls, "forward", None) is getattr(base, "forward", None):
            return helper, None
        return helper, (f"{cls.__name__} subclasses {base.__name__} with its own forward")
    name = qualified_name(cls)
    for key, helper in HELPERS._table.items():
        if isinstance(key, str) and "*" in key and fnmatch.fnmatchcase(name, key):
            return helper, f"{cls.__name__} matched by the name pattern {key!r}"
    return None, None


def helper_class(module: nn.Module) -> type[LayerHelper] | None:
    """The helper for ``module`` (:func:`match`), or ``None``."""
    return match(module)[0]


def helper_for(module: nn.Module) -> tuple[LayerHelper | None, str | None]:
    """The helper for ``module`` and, when it cannot be preconditioned, the reason why.

    Returns ``(None, None)`` for module types without a helper (they hold no weights we
    precondition or are simply not known), ``(None, reason)`` for known but unsupported
    configurations. A helper for a candidate module (:func:`match`) verifies it on its first
    recorded forward.
    """
    cls, verify = match(module)
    if cls is None:
        return None, None
    cls = cls.variant(module)
    reason = cls.unsupported_reason(module)
    if reason is not None:
        return None, reason
    return cls(module, verify=verify), None
