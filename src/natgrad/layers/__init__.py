"""Layer helpers: one per module type, chosen from a table (:data:`HELPERS`).

Adding a layer type = one new module with a :class:`LayerHelper` subclass and one
:func:`register_layer` call.
"""

from __future__ import annotations

from torch import nn

from .base import LayerHelper
from .conv2d import Conv2dHelper
from .linear import LinearHelper
from .registry import HELPERS, helper_class, helper_for, register_layer, unregister_layer

register_layer(nn.Linear, LinearHelper)
register_layer(nn.Conv2d, Conv2dHelper)

__all__ = [
    "HELPERS",
    "Conv2dHelper",
    "LayerHelper",
    "LinearHelper",
    "helper_class",
    "helper_for",
    "register_layer",
    "unregister_layer",
]
