"""Layer helpers: one per module type, chosen from a table.

Adding a layer type = one new module with a :class:`LayerHelper` subclass and one entry in
:data:`HELPERS`.
"""

from __future__ import annotations

from torch import nn

from .base import LayerHelper
from .conv2d import Conv2dHelper
from .linear import LinearHelper

HELPERS: dict[type[nn.Module], type[LayerHelper]] = {
    nn.Linear: LinearHelper,
    nn.Conv2d: Conv2dHelper,
}


def helper_for(module: nn.Module) -> tuple[LayerHelper | None, str | None]:
    """The helper for ``module`` and, when it cannot be preconditioned, the reason why.

    Returns ``(None, None)`` for module types without a helper (they hold no weights we precondition
    or are simply not known), ``(None, reason)`` for known but unsupported configurations.
    """
    cls = HELPERS.get(type(module))
    if cls is None:
        return None, None
    reason = cls.unsupported_reason(module)
    if reason is not None:
        return None, reason
    return cls(module), None


__all__ = ["HELPERS", "LayerHelper", "LinearHelper", "Conv2dHelper", "helper_for"]
