"""Optimizers and the registry that builds them by name."""

from .registry import OPTIMIZERS, OptimizerSpec, make_optimizer

__all__ = ["OPTIMIZERS", "OptimizerSpec", "make_optimizer"]
