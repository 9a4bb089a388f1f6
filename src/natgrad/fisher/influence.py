"""Influence scores and EWC importance on top of the damped inverse products.

* **Influence** (Koh & Liang 2017, with the Fisher / GGN for the Hessian as in EK-FAC influence,
  Grosse et al. 2023): the score of training sample ``z`` on test sample ``t`` is

      ``I(t, z) = g_tᵀ (F + λ I)⁻¹ g_z``,

  ``g`` the gradients of the per-sample negative log-likelihoods. Up-weighting ``z`` by ``ε``
  changes the test loss by ``−ε I(t, z)`` to first order: positive scores are helpful samples.
  Any inverse operator serves (:func:`natgrad.fisher.damped_inverse`: EK-FAC, K-FAC or
  conjugate gradients); the inverse is applied to the (few) test gradients only.
* **EWC** (Kirkpatrick et al. 2017): after a task with parameters ``θ*``, the penalty
  ``(s/2) (θ − θ*)ᵀ F (θ − θ*)`` keeps later training close to ``θ*`` where the Fisher ``F`` of
  that task is large. :func:`ewc_importance` gives ``F`` as an operator (its exact diagonal, or
  K-FAC), :func:`ewc_penalty` the differentiable penalty.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._model import Data
from .base import LinearOperator
from .ekfac import EKFACOperator
from .ggn import EmpiricalFisher, ExactFisher, GGNOperator, MCFisher
from .inverse import damped_inverse
from .kfac import KFACOperator

FISHERS: dict[str, type[GGNOperator]] = {
    "exact": ExactFisher, "mc": MCFisher, "empirical": EmpiricalFisher}
INFLUENCE_METHODS = ("ekfac", "kfac", "cg")
IMPORTANCE_KINDS = ("diagonal", "kfac")

__all__ = ["DiagonalOperator", "FISHERS", "IMPORTANCE_KINDS", "INFLUENCE_METHODS",
           "ewc_importance", "ewc_penalty", "influence", "influence_scores",
           "sample_gradients"]


def _choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def sample_gradients(model: nn.Module, data: Data, loss: str = "cross_entropy",
                     params: Sequence[Tensor] | Sequence[str] | None = None,
                     chunk_size: int = 256, memory_elements: int = 1 << 25) -> Tensor:
    """``(N, P)``: the gradient of each sample's negative log-likelihood (summed over its
    positions) in the flat parameter order of the operators (``named_parameters``); needs
    labels. One backward pass per sample, vmapped."""
    op = EmpiricalFisher(model, data, loss, params=params, chunk_size=chunk_size)
    return torch.cat(list(op.sample_rows(memory_elements)))


def influence_scores(inverse: LinearOperator, test_gradients: Tensor,
                     train_gradients: Tensor) -> Tensor:
    """``(T, N)``: ``g_testᵀ H⁻¹ g_train`` for ``H⁻¹`` = ``inverse`` (e.g. ``(F + λI)⁻¹``).

    Args:
        inverse: a symmetric inverse operator on the same parameters as the gradients.
        test_gradients: ``(T, P)`` (or ``(P,)``).
        train_gradients: ``(N, P)``.
    """
    test = test_gradients.reshape(-1, inverse.dim) if test_gradients.ndim == 1 else test_gradients
    for name, g in (("test_gradients", test), ("train_gradients", train_gradients)):
        if g.ndim != 2 or g.shape[1] != inverse.dim:
            raise ValueError(f"{name} must be (k, {inverse.dim}), got {tuple(g.shape)}")
    solved = inverse @ test.T.to(inverse.dtype)  # (P, T)
    return solved.T @ train_gradients.to(solved.dtype).T


def influence(model: nn.Module, train_data: Data, test_data: Data, loss: str = "cross_entropy",
              method: str = "ekfac", damping: float = 1e-3, fisher: str = "exact",
              params: Sequence[Tensor] | Sequence[str] | None = None, chunk_size: int = 256,
              **inverse_options: Any) -> Tensor:
    """``(T, N)`` influence scores of the training samples on the test samples' losses.

    Args:
        method: ``"ekfac"`` (:class:`~natgrad.fisher.EKFACOperator`), ``"kfac"``
            (:class:`~natgrad.fisher.KFACOperator`, ``eigh`` factors) or ``"cg"`` (conjugate
            gradients on the Fisher operator; ``inverse_options`` go to
            :class:`~natgrad.fisher.CGInverse`).
        damping: ``λ > 0``.
        fisher: the Fisher of the training data, ``"exact"``, ``"mc"`` or ``"empirical"``.
    """
    _choice("method", method, INFLUENCE_METHODS)
    F = FISHERS[_choice("fisher", fisher, tuple(FISHERS))](
        model, train_data, loss, params=params, chunk_size=chunk_size)
    if method == "cg":
        op: LinearOperator = F
    else:
        kfac = KFACOperator.from_data(model, train_data, loss, fisher, chunk_size=chunk_size)
        if kfac.names != F.names:
            raise ValueError("method='kfac'/'ekfac' acts on every trainable parameter: leave "
                             "params unset or use method='cg'")
        op = kfac if method == "kfac" else EKFACOperator.from_fisher(F, kfac)
    inverse = damped_inverse(op, damping, **inverse_options)
    return influence_scores(inverse, sample_gradients(model, test_data, loss, params, chunk_size),
                            sample_gradients(model, train_data, loss, params, chunk_size))


class DiagonalOperator(LinearOperator):
    """``diag(d)`` on the parameter blocks of ``like``.

    Args:
        like: the operator whose names, shapes, dtype and device it takes.
        diagonal: ``(P,)``.
    """

    def __init__(self, like: LinearOperator, diagonal: Tensor) -> None:
        super().__init__(like.names, like.shapes, like.dtype, like.device)
        if diagonal.shape != (self.dim,):
            raise ValueError(f"diagonal must have shape ({self.dim},), got "
                             f"{tuple(diagonal.shape)}")
        self.diag = diagonal.to(self.dtype)

    def _matmat(self, V: Tensor) -> Tensor:
        return self.diag.unsqueeze(-1) * V

    def diagonal(self) -> Tensor:
        return self.diag


def ewc_importance(model: nn.Module, data: Data, loss: str = "cross_entropy",
                   kind: str = "diagonal", fisher: str = "exact",
                   params: Sequence[Tensor] | Sequence[str] | None = None,
                   chunk_size: int = 256, **fisher_options: Any) -> LinearOperator:
    """The Fisher of a finished task as an EWC importance operator.

    Args:
        kind: ``"diagonal"`` (the exact diagonal of the Fisher, :class:`DiagonalOperator`) or
            ``"kfac"`` (:class:`~natgrad.fisher.KFACOperator` with ``eigh`` factors, on every
            trainable parameter).
        fisher: ``"exact"``, ``"mc"`` or ``"empirical"``.
        fisher_options: e.g. ``mc_samples``, ``seed`` for the MC Fisher.
    """
    _choice("kind", kind, IMPORTANCE_KINDS)
    cls = FISHERS[_choice("fisher", fisher, tuple(FISHERS))]
    if kind == "kfac":
        if params is not None:
            raise ValueError("kind='kfac' acts on every trainable parameter: leave params unset")
        return KFACOperator.from_data(model, data, loss, fisher, chunk_size=chunk_size,
                                      **fisher_options)
    F = cls(model, data, loss, params=params, chunk_size=chunk_size, **fisher_options)
    return DiagonalOperator(F, F.diagonal())


def ewc_penalty(model: nn.Module, anchor: Mapping[str, Tensor] | Sequence[Tensor],
                importance: LinearOperator, strength: float = 1.0) -> Tensor:
    """``(s/2) (θ − θ*)ᵀ F (θ − θ*)``, differentiable in the model's current parameters ``θ``.

    Args:
        anchor: ``θ*``, by parameter name (e.g. a detached copy of ``model.state_dict()``) or as
            tensors in the importance operator's order.
        importance: ``F`` (:func:`ewc_importance`), on parameters of ``model``.
        strength: ``s ≥ 0``.
    """
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or strength < 0:
        raise ValueError(f"strength must be a non-negative number, got {strength!r}")
    current = dict(model.named_parameters())
    missing = [n for n in importance.names if n not in current]
    if missing:
        raise ValueError(f"the importance operator names parameters the model lacks: {missing}")
    if isinstance(anchor, Mapping):
        absent = [n for n in importance.names if n not in anchor]
        if absent:
            raise ValueError(f"anchor lacks the parameters {absent}")
        anchors = [anchor[n] for n in importance.names]
    else:
        anchors = list(anchor)
        if len(anchors) != len(importance.names):
            raise ValueError(f"anchor must hold {len(importance.names)} tensors, got "
                             f"{len(anchors)}")
    delta = torch.cat([(current[n] - a.detach().to(current[n])).reshape(-1).to(importance.dtype)
                       for n, a in zip(importance.names, anchors)])
    return 0.5 * strength * (delta @ importance._matmat(delta[:, None])[:, 0])
