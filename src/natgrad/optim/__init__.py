"""Optimizers and the registry that builds them by name.

``natgrad.optim.KFAC``, :class:`EigenAdam` and :class:`PreconditionedOptimizer` are imported on
first use, so the registry (read by the command line's help) loads without torch.
"""

from typing import Any

from .registry import OPTIMIZERS, OptimizerSpec, make_optimizer

__all__ = ["KFAC", "OPTIMIZERS", "EigenAdam", "EigenAdamOptions", "GraftOptions", "OptimizerSpec",
           "PreconditionedOptimizer", "RelativeClip", "make_optimizer"]


def __getattr__(name: str) -> Any:
    if name == "KFAC":
        from .kfac import KFAC

        return KFAC
    if name == "PreconditionedOptimizer":
        from .preconditioned import PreconditionedOptimizer

        return PreconditionedOptimizer
    if name == "GraftOptions":
        from .grafting import GraftOptions

        return GraftOptions
    if name == "EigenAdam":
        from .eigen_adam_optimizer import EigenAdam

        return EigenAdam
    if name == "EigenAdamOptions":
        from .eigen_adam import EigenAdamOptions

        return EigenAdamOptions
    if name == "RelativeClip":
        from .relative_clip import RelativeClip

        return RelativeClip
    raise AttributeError(f"module 'natgrad.optim' has no attribute {name!r}")
