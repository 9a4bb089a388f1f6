"""Measurements behind ``natgrad bench``: cost scaling of the factor strategies and the numerical
stability of K-FAC variants over a damping sweep."""

from .scaling import ScalingConfig, run_scaling
from .stability import StabilityConfig, run_stability

__all__ = ["ScalingConfig", "StabilityConfig", "run_scaling", "run_stability"]
