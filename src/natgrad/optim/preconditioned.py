"""A ``torch.optim`` optimizer behind natgrad's natural-gradient preconditioner.

:class:`PreconditionedOptimizer` pairs a :class:`natgrad.KFAC` in preconditioner mode (it writes
the damped, KL-clipped natural-gradient direction into ``.grad``) with any optimizer that then
takes the step (AdamW, SGD with Nesterov, ...)::

    pre = natgrad.KFAC(model, factors="projected", preconditioner=True)
    opt = natgrad.optim.PreconditionedOptimizer(pre, torch.optim.AdamW(model.parameters()))
    loss.backward(); opt.step()          # pre.step(), then AdamW's step
    torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=...)   # schedules the inner lr

It is a ``torch.optim.Optimizer`` whose ``param_groups`` and ``state`` *are* the inner
optimizer's, so LR schedulers, gradient clipping and ``GradScaler.step`` work unchanged (the
preconditioner's KL-clip uses the inner optimizer's current learning rate, its first group's);
``zero_grad`` and ``state_dict`` / ``load_state_dict`` cover both parts (a load validates the
preconditioner's state before changing anything, and a load that fails part-way leaves both parts
as they were).
"""

from __future__ import annotations

from typing import Any

import torch

from .kfac import KFAC


def load_together(first: Any, first_state: Any, second: Any, second_state: Any) -> None:
    """Load two optimizers' states as one: when ``second`` refuses its state, ``first`` is put
    back as it was (a load makes new tensors, so the saved ``state_dict`` stays intact), so a
    failed load changes nothing. ``second`` may be ``None`` (nothing to load)."""
    before = first.state_dict()
    first.load_state_dict(first_state)
    if second is None:
        return
    try:
        second.load_state_dict(second_state)
    except BaseException:
        first.load_state_dict(before)
        raise

class PreconditionedOptimizer(torch.optim.Optimizer):
    """``preconditioner.step()`` then ``optimizer.step()`` as one ``torch.optim.Optimizer``.

    Args:
        preconditioner: a :class:`natgrad.KFAC` made with ``preconditioner=True``.
        optimizer: the optimizer that takes the step, over the same parameters.
    """

    def __init__(self, preconditioner: KFAC, optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(preconditioner, KFAC) or not preconditioner.preconditioner:
            raise ValueError("preconditioner must be a natgrad.KFAC made with "
                             "preconditioner=True")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, got "
                             f"{type(optimizer).__name__}")
        mine = {id(p) for g in preconditioner.param_groups for p in g["params"]}
        theirs = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if not mine <= theirs:
            raise ValueError("the optimizer must hold every parameter the preconditioner "
                             "preconditions")
        # torch.optim's bookkeeping (hooks, step patching), then share the inner optimizer's
        # groups and state: schedulers and scalers act on the optimizer that takes the step
        super().__init__([torch.zeros(1, requires_grad=True)], {})
        self.preconditioner = preconditioner
        self.optimizer = optimizer
        self._share()

    def _share(self) -> None:
        """Point ``param_groups``, ``state`` and ``defaults`` at the inner optimizer's (again
        after a load, which replaces them: a scheduler made on this object must keep acting on
        the groups that take the step)."""
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self.defaults = self.optimizer.defaults

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        lr = self.optimizer.param_groups[0]["lr"]  # the KL-clip follows the step's (scheduled) lr
        for group in self.preconditioner.param_groups:
            group["lr"] = lr
        self.preconditioner.step()
        self.optimizer.step()
        return loss

    @property
    def curvature(self) -> Any:
        """The preconditioner's :class:`~natgrad.curvature.KroneckerCurvature`."""
        return self.preconditioner.curvature

    @property
    def precondition(self) -> bool:
        """Whether the preconditioner preconditions (``natgrad.KFAC``'s flag)."""
        return self.preconditioner.precondition

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.preconditioner.zero_grad(set_to_none)
        self.optimizer.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"optimizer": self.optimizer.state_dict(),
                "preconditioner": self.preconditioner.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        if not isinstance(state_dict, dict) or set(state_dict) != {"optimizer",
                                                                    "preconditioner"}:
            raise ValueError("state_dict must hold 'optimizer' and 'preconditioner'")
        pre = state_dict["preconditioner"]
        if isinstance(pre, dict) and "natgrad" in pre:
            self.preconditioner._check_natgrad_state(pre["natgrad"])
        try:
            load_together(self.optimizer, state_dict["optimizer"], self.preconditioner, pre)
        finally:
            self._share()

    def __repr__(self) -> str:
        return (f"PreconditionedOptimizer({type(self.optimizer).__name__}, "
                f"{self.preconditioner.strategy} K-FAC)")
