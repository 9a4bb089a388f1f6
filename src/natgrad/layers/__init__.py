"""Layer helpers: one per module type, chosen from a table (:data:`HELPERS`).

Adding a layer type = one new module with a :class:`LayerHelper` subclass and one
:func:`register_layer` call.
"""

from __future__ import annotations

from .base import LayerHelper
from .conv2d import Conv2dHelper
from .embedding import EmbeddingHelper
from .grouped_conv2d import GroupedConv2dHelper
from .linear import LinearHelper
from .normalization import BatchNormHelper, GroupNormHelper, LayerNormHelper, NormHelper
from .registry import (
    HELPERS,
    helper_class,
    helper_for,
    match,
    qualified_name,
    register_layer,
    unregister_layer,
)
from .rmsnorm import RMSNormHelper
from .transposed_linear import TransposedLinearHelper

for _helper in (LinearHelper, Conv2dHelper, EmbeddingHelper, LayerNormHelper, BatchNormHelper,
                GroupNormHelper, RMSNormHelper):
    register_layer(_helper.module_type, _helper)
# by name, without importing transformers (its Conv1D is trusted; its RMSNorm variants checked)
register_layer("transformers.pytorch_utils.Conv1D", TransposedLinearHelper)
register_layer("transformers.*RMSNorm", RMSNormHelper)

__all__ = [
    "HELPERS",
    "BatchNormHelper",
    "Conv2dHelper",
    "EmbeddingHelper",
    "GroupNormHelper",
    "GroupedConv2dHelper",
    "RMSNormHelper",
    "TransposedLinearHelper",
    "LayerNormHelper",
    "NormHelper",
    "LayerHelper",
    "LinearHelper",
    "helper_class",
    "helper_for",
    "match",
    "qualified_name",
    "register_layer",
    "unregister_layer",
]
