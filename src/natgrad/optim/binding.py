"""How often a step-size rule decided the step: no dead knobs.

When a rule such as the KL-clip ``ν = min(1, sqrt(κ / η² gᵀF⁻¹g))`` binds, the step no longer
depends on the learning rate: ``η ν = sqrt(κ / gᵀF⁻¹g)``. A :class:`BindingRecord` counts the
steps on which its rule bound, keeps the last quadratic ``η² gᵀF⁻¹g`` it saw, and says once (a
``RuntimeWarning`` naming the knob and the fraction) when the rule decided most of the first
``window`` steps — the learning rate was then a dead knob. The counts are part of
:meth:`natgrad.KFAC.diagnostics` and the registration summary.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any


@dataclasses.dataclass
class BindingRecord:
    """Counts of one rule's binding steps.

    Args:
        knob: the hyperparameter that decides the step when the rule binds (e.g. ``"kl_clip"``).
        window: steps after which the fraction is judged (once).
        threshold: the fraction of binding steps above which natgrad warns.
    """

    knob: str
    window: int = 50
    threshold: float = 0.5
    steps: int = 0
    bound: int = 0
    last_quadratic: float | None = None
    warned: bool = False

    @property
    def fraction(self) -> float:
        """Fraction of recorded steps on which the rule bound (0 before any step)."""
        return self.bound / self.steps if self.steps else 0.0

    def record(self, bound: bool, quadratic: float | None = None, value: Any = None) -> None:
        """Count one step; warn once when the first ``window`` steps bound more than
        ``threshold`` of the time. ``value`` is the knob's value, for the message."""
        self.steps += 1
        self.bound += int(bound)
        if quadratic is not None:
            self.last_quadratic = quadratic
        if not self.warned and self.steps == self.window and self.fraction > self.threshold:
            self.warned = True
            warnings.warn(
                f"natgrad.KFAC: {self.knob}={value!r} decided the step size on "
                f"{100 * self.fraction:.0f}% of the first {self.steps} steps, so the learning "
                f"rate had no effect on them (last η²gᵀF⁻¹g = {self.last_quadratic:.3g}); see "
                "optimizer.diagnostics() and docs/DESIGN.md 'Step size'",
                RuntimeWarning, stacklevel=4)

    def as_dict(self) -> dict[str, Any]:
        """The counts (JSON-ready)."""
        return {"steps": self.steps, "bound": self.bound, "fraction": self.fraction,
                "last_quadratic": self.last_quadratic}

    def summary(self) -> str:
        """One line for the registration summary."""
        return (f"  {self.knob} bound on {self.bound}/{self.steps} steps "
                f"({100 * self.fraction:.0f}%)")

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "bound": self.bound, "warned": self.warned,
                "last_quadratic": self.last_quadratic}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.bound = int(state["steps"]), int(state["bound"])
        self.warned = bool(state["warned"])
        self.last_quadratic = state.get("last_quadratic")
