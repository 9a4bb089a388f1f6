"""Layer helpers: one per module type, chosen from a table (:data:`HELPERS`).

Adding a layer type = one new module with a :class:`LayerHelper` subclass and one
:func:`register_layer` call.
"""

from __future__ import annotations

from .base import LayerHelper
from .conv2d import Conv2dHelper
from .embedding import EmbeddingHelper
from .linear import LinearHelper
from .normalization import BatchNormHelper, GroupNormHelper, LayerNormHelper, NormHelper
from .registry import HELPERS, helper_class, helper_for, register_layer, unregister_layer

for _helper in (LinearHelper, Conv2dHelper, EmbeddingHelper, LayerNormHelper, BatchNormHelper,
                GroupNormHelper):
    register_layer(_helper.module_type, _helper)

__all__ = [
    "HELPERS",
    "BatchNormHelper",
    "Conv2dHelper",
    "EmbeddingHelper",
    "GroupNormHelper",
    "LayerNormHelper",
    "NormHelper",
    "LayerHelper",
    "LinearHelper",
    "helper_class",
    "helper_for",
    "register_layer",
    "unregister_layer",
]
