"""natgrad: matrix-free Fisher analysis and natural-gradient optimizers for PyTorch."""

from ._version import __version__
from .optim.kfac import KFAC

__all__ = ["KFAC", "__version__"]
