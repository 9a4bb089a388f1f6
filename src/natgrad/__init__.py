"""natgrad: matrix-free Fisher analysis and natural-gradient optimizers for PyTorch."""

from .optim.kfac import KFAC

__version__ = "0.1.0"

__all__ = ["KFAC", "__version__"]
