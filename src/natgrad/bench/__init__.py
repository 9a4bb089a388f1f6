"""Measurements behind ``natgrad bench``: cost scaling of the factor strategies and the numerical
stability of K-FAC variants over a damping sweep, and step times of optimizers taking turns."""

from .scaling import ScalingConfig, run_scaling
from .stability import StabilityConfig, run_stability
from .steps import StepConfig, interleaved_step_times

__all__ = ["ScalingConfig", "StabilityConfig", "StepConfig", "interleaved_step_times",
           "run_scaling", "run_stability"]
