"""A KL-clip relative to the step's own history: it cuts outliers, not every step.

The absolute KL-clip ``ν = min(1, sqrt(κ / q))`` with ``q = η² gᵀF⁻¹g`` binds whenever
``q > κ``. For a minibatch gradient ``gᵀF⁻¹g`` is dominated by gradient noise,
``E[gᵀF⁻¹g] ≈ ḡᵀF⁻¹ḡ + d_eff(λ) / N`` (``N`` samples, ``d_eff(λ) = Σ_i f_i / (f_i + λ)`` the
effective dimension of the damped Fisher), and it scales with the square of the loss's
normalisation (a mean over ``B·T`` positions against natgrad's per-sequence sums: ``T²``). So no
fixed κ suits models of different sizes, batch sizes and loss conventions: on a 0.4M-parameter
character GPT, ``gᵀF⁻¹g ≈ 0.2 … 1`` per step (mean loss), κ = 1e-3 binds for every
``η > 0.03 … 0.08`` and the learning rate stops mattering (docs/DESIGN.md, "Step size").

:class:`RelativeClip` measures ``q`` in units of its own running scale instead: with
``s_t`` the exponential moving average (decay ``decay``) of ``log q`` over the previous steps,

    ``ν = min(1, sqrt(ratio · exp(s_t) / q))``

so a step is cut only when its quadratic exceeds ``ratio`` times the running geometric mean —
a spike (a bad batch, fresh curvature) — whatever the loss convention, damping, model size or
learning rate. The first step sets the scale and is never cut. The learning rate multiplies
every ``q`` alike, so it decides the step length.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any


@dataclasses.dataclass
class RelativeClip:
    """The relative KL-clip (module docstring); pass as ``natgrad.KFAC(kl_clip=RelativeClip())``
    or ``kl_clip="relative"``.

    Args:
        ratio: how far above its running geometric mean a quadratic may go uncut (> 1).
        decay: EMA decay of ``log q`` (in ``[0, 1)``).
    """

    ratio: float = 4.0
    decay: float = 0.95
    log_scale: float | None = None

    def __post_init__(self) -> None:
        for name, ok, accepted in (("ratio", lambda v: v > 1, "a finite number > 1"),
                                   ("decay", lambda v: 0 <= v < 1, "a number in [0, 1)")):
            v = getattr(self, name)
            if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                    or not ok(v)):
                raise ValueError(f"invalid RelativeClip {name}={v!r}: expected {accepted}")

    def scale(self, q: float) -> float:
        """``ν`` for the quadratic ``q = η² gᵀF⁻¹g`` of this step; then fold ``q`` into the
        running scale. Non-positive or non-finite ``q`` give 1 and leave the scale alone."""
        if not (q > 0 and math.isfinite(q)):
            return 1.0
        log_q = math.log(q)
        if self.log_scale is None:
            self.log_scale = log_q
            return 1.0
        nu = min(1.0, math.sqrt(self.ratio * math.exp(self.log_scale - log_q)))
        self.log_scale = self.decay * self.log_scale + (1 - self.decay) * log_q
        return nu

    def state_dict(self) -> dict[str, Any]:
        return {"log_scale": self.log_scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        value = state.get("log_scale")
        if value is not None and not (isinstance(value, float) and math.isfinite(value)):
            raise ValueError(f"invalid RelativeClip state log_scale={value!r}")
        self.log_scale = value

    def __repr__(self) -> str:
        return f"RelativeClip(ratio={self.ratio}, decay={self.decay})"
