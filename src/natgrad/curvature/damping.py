"""The damping floor: the smallest damping a block's factors can resolve in their precision.

The damped solve ``(F + λ I)⁻¹ v`` of a block with largest eigenvalue ``λ_max`` has condition
number ``1 + λ_max / λ``. Its factors are only known to about ``eps · λ_max`` (the dtype's machine
epsilon: rounding in the statistics, the EMA and the decomposition), so a damping far below that
divides noise by ``λ``: with float32 factors and ``λ = 1e-10`` the natural-gradient step grows
along directions whose curvature is rounding noise, the KL-clip (which measures the step with
the same noisy curvature) does not stop it, and training diverges without a non-finite number
anywhere. The floor

    ``λ_floor = √eps · λ_max``

keeps the condition number below ``1 + 1/√eps`` (about 2.9e3 in float32, 6.7e7 in float64), so
the solve keeps about half the working precision. ``λ_max`` of a Kronecker block ``A ⊗ G`` is
``λ_max(A) · λ_max(G)``; each factor's comes from its eigendecomposition (spectral strategies),
its diagonal (diagonal factors) or a few power-iteration steps (the others, a lower bound, so the
floor never exceeds ``√eps · λ_max``).
"""

from __future__ import annotations

import math

import torch

from ..blocks import CurvatureBlock
from ..factors import KroneckerFactor

#: power-iteration steps for the largest eigenvalue of a factor without a decomposition
POWER_STEPS = 12


def largest_eigenvalue(f: KroneckerFactor) -> float:
    """``λ_max`` of the represented factor (exact for spectral and diagonal factors, a lower
    bound from power iteration and the largest diagonal entry otherwise)."""
    if f.dim == 0:
        return 0.0
    if getattr(f, "diagonal", False):
        return float(f.diag().max())
    if f.spectral:
        _, mu, sigma = f.eigen()
        return max(float(mu.max()) if mu.numel() else 0.0, float(sigma))
    F = f.to_dense()
    v = torch.full((f.dim, 1), f.dim ** -0.5, dtype=F.dtype, device=F.device)
    for _ in range(POWER_STEPS):
        w = F @ v
        norm = w.norm()
        if not bool(norm > 0):
            break
        v = w / norm
    rayleigh = float((v * (F @ v)).sum())
    return max(rayleigh, float(F.diagonal().max()))


def damping_floor(block: CurvatureBlock) -> float:
    """``√eps · λ_max`` of ``block`` (the product of its factors' largest eigenvalues), ``eps``
    the machine epsilon of its factors' dtype; 0 for a block without curvature yet."""
    top = 1.0
    for f in block.factors:
        top *= max(largest_eigenvalue(f), 0.0)
    if not math.isfinite(top):
        return 0.0
    return math.sqrt(torch.finfo(block.factors[0].dtype).eps) * top
