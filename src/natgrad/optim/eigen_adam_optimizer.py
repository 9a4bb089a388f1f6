"""``natgrad.EigenAdam``: natgrad's AdamW pairing at its shipped defaults.

:class:`natgrad.KFAC` with ``eigen_adam`` (Adam in the Kronecker eigenbasis of K-FAC's factors,
:mod:`natgrad.optim.eigen_adam`) and the schedule it was measured with: the factors and their
bases refreshed every 10 steps (SOAP's ``precondition_frequency``) with decay 0.8 per refresh,
and AdamW's decoupled weight decay 0.01 (``torch.optim.AdamW``'s default), with a layer's
statistics taken from at most 4,096 rows (samples × locations) per forward
(``max_statistics_rows``: for convolutions; the character GPT's 32 × 64 rows are below it).
This is the configuration of the registry's ``eigenadam`` and of the races in docs/RESULTS.md,
so
``natgrad.EigenAdam(model, lr=...)`` is what a user gets after tuning only the learning rate,
as every other optimizer in the race.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from . import hyper
from .eigen_adam import EigenAdamOptions
from .kfac import KFAC

#: the keyword arguments of :class:`natgrad.KFAC` that :class:`EigenAdam` fixes itself (Adam's
#: moments set the step length): passing one is a ``ValueError`` naming its replacement
_FIXED = {"eigen_adam": "betas= and eps=", "graft": "nothing (Adam sets the step length)",
          "kl_clip": "nothing (Adam sets the step length)", "momentum": "betas[0]",
          "preconditioner": "nothing (EigenAdam takes the step)"}


class EigenAdam(KFAC):
    """Adam in K-FAC's Kronecker eigenbasis, with the schedule of natgrad's race.

    Args:
        model: the network (may be wrapped in DDP).
        lr: Adam's learning rate (the units of ``torch.optim.AdamW``'s).
        betas: Adam's ``(β₁, β₂)`` (:class:`~natgrad.optim.EigenAdamOptions`).
        eps: ε added to the root of the second moment.
        weight_decay: decoupled weight decay (AdamW's; default 0.01 as ``torch.optim.AdamW``).
        factors: ``"eigh"`` (dense bases) or ``"projected"`` (a rank-r eigenbasis and Adam on its
            complement).
        curvature_every: steps between factor updates (default 10).
        inverse_every: steps between basis refreshes (default 10).
        factor_decay: decay of the factors per update (default 0.8: with updates 10 steps apart,
            about the memory of K-FAC's 0.95 per step over the same steps).
        max_statistics_rows: the most rows (samples × locations) a Linear / Conv2d layer's
            statistics take from one forward (default 4,096; ``None``: all). On ResNet-8 at
            batch 128 on MNIST it made the step 17 % cheaper (266 against 320 ms, SGD's 222)
            with no loss of progress over 300 steps (docs/DISCUSSION.md, issue 25).
        **kwargs: any other argument of :class:`natgrad.KFAC` (``params``, ``loss``, ``fisher``,
            ``damping``, ``factor_options``, ``output_key``, ``distributed``, …), except those
            that set the step length (``eigen_adam``, ``graft``, ``kl_clip``, ``momentum``,
            ``preconditioner``).

    Its ``state_dict`` is :class:`natgrad.KFAC`'s: a checkpoint of either loads into the other
    when the arguments agree.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: hyper.Schedule = 3e-3,
        *,
        betas: tuple[float, float] = EigenAdamOptions.betas,
        eps: float = EigenAdamOptions.eps,
        weight_decay: hyper.Schedule = 0.01,
        factors: str = "eigh",
        curvature_every: hyper.Schedule = 10,
        inverse_every: hyper.Schedule = 10,
        factor_decay: hyper.Schedule = 0.8,
        max_statistics_rows: int | None = 4096,
        **kwargs: Any,
    ) -> None:
        for name, instead in _FIXED.items():
            if name in kwargs:
                raise ValueError(f"invalid {name}={kwargs[name]!r} for natgrad.EigenAdam: it is "
                                 f"fixed by the optimizer; use {instead} (or natgrad.KFAC)")
        betas = hyper.adam_moments("natgrad.EigenAdam", betas, eps)
        super().__init__(model, lr, eigen_adam=EigenAdamOptions(betas=betas, eps=eps),
                         weight_decay=weight_decay, factors=factors,
                         curvature_every=curvature_every, inverse_every=inverse_every,
                         factor_decay=factor_decay, max_statistics_rows=max_statistics_rows,
                         **kwargs)
