"""Per-layer curvature blocks: what the curvature engine keeps for each preconditioned layer.

:class:`KroneckerBlock` (``A ⊗ G``, K-FAC) serves Linear and Conv2d layers; a layer helper
(:mod:`natgrad.layers`) says which block its layer gets (:meth:`LayerHelper.make_block`).
"""

from .base import CurvatureBlock, LayerStatistics
from .kronecker import KroneckerBlock

__all__ = ["CurvatureBlock", "KroneckerBlock", "LayerStatistics"]
