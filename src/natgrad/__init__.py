"""natgrad: matrix-free Fisher analysis and natural-gradient optimizers for PyTorch.

``import natgrad`` is light: :class:`KFAC`, :class:`EigenAdam` and the sub-packages
(``natgrad.fisher``, ``natgrad.models``, …) are imported on first access (PEP 562), so the
``natgrad`` command can answer ``--help`` and ``--version`` without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:  # pragma: no cover - imported lazily by __getattr__
    from .optim.eigen_adam_optimizer import EigenAdam
    from .optim.kfac import KFAC

__all__ = ["KFAC", "EigenAdam", "__version__"]

#: the public sub-packages and modules, reachable as attributes of ``natgrad``
SUBMODULES = (
    "bench", "blocks", "cli", "curvature", "data", "distributed", "experiments", "factors",
    "fisher", "layers", "likelihoods", "losses", "models", "norms", "optim", "progress",
    "report", "reproduce",
)


def __getattr__(name: str) -> Any:
    """``natgrad.KFAC``, ``natgrad.EigenAdam`` and ``natgrad.<sub-package>``, imported on first
    access."""
    if name == "KFAC":
        from .optim.kfac import KFAC

        return KFAC
    if name == "EigenAdam":
        from .optim.eigen_adam_optimizer import EigenAdam

        return EigenAdam
    if name in SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *SUBMODULES})
