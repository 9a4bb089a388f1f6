"""Loss kinds: the one table that ties a model's output to its loss and likelihood.

Every loss here is the mean over the batch of a per-sample negative log-likelihood (up to an
additive constant), the convention of DESIGN.md §1:

================  ==============================================  ==================  ==========
kind              per-sample loss                                 likelihood          accuracy?
================  ==============================================  ==================  ==========
``cross_entropy`` ``-log softmax(f)[y]``                          categorical         yes
``bce``           ``Σ_pixels BCEWithLogits(f, y)``                Bernoulli (logits)  no
``mse``           ``½ ‖f − y‖²``                                  Gaussian, σ² = 1    no
================  ==============================================  ==================  ==========

For sequence logits ``(m, T, C)`` the ``cross_entropy`` loss is the mean over samples and
positions (the usual language-model loss). ``bce`` and ``mse`` *sum* over output coordinates
and average over samples; a K-FAC optimizer
told ``loss=<kind>`` can sample targets from :attr:`LossKind.likelihood` and use output-space
Hessians ``diag(p) − p pᵀ`` (categorical), ``diag(σ(f)(1 − σ(f)))`` (Bernoulli) or ``I`` (Gaussian).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _cross_entropy(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Logits ``(m, …, C)``, labels ``(m, …)``: the mean over every sample and position (for
    ``(m, C)`` exactly ``F.cross_entropy``)."""
    if out.ndim == 2:
        return F.cross_entropy(out, target)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))


def _bce(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``out``, ``target``: ``(m, D)``; returns the mean over ``m`` of the sum over ``D``."""
    loss = F.binary_cross_entropy_with_logits(out, target.reshape(out.shape), reduction="sum")
    return loss / out.shape[0]


def _mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``out``, ``target``: ``(m, D)``; returns ``mean_m ½ Σ_D (out − target)²``."""
    return 0.5 * (out - target.reshape(out.shape)).pow(2).sum() / out.shape[0]


@dataclass(frozen=True)
class LossKind:
    """One loss kind.

    Attributes:
        name: the string passed around (``loss_kind="cross_entropy"``).
        fn: ``fn(output (m, …), target) -> scalar``, the batch mean of the per-sample NLL.
        likelihood: ``"categorical"``, ``"bernoulli"`` or ``"gaussian"``.
        has_accuracy: whether classification accuracy is meaningful.
    """

    name: str
    fn: LossFn
    likelihood: str
    has_accuracy: bool


LOSSES: dict[str, LossKind] = {
    "cross_entropy": LossKind("cross_entropy", _cross_entropy, "categorical", True),
    "bce": LossKind("bce", _bce, "bernoulli", False),
    "mse": LossKind("mse", _mse, "gaussian", False),
}


def get_loss(kind: str) -> LossKind:
    """The :class:`LossKind` for ``kind``; ``ValueError`` listing the accepted kinds otherwise."""
    try:
        return LOSSES[kind]
    except KeyError:
        raise ValueError(f"unknown loss kind {kind!r}; accepted: {', '.join(LOSSES)}") from None
