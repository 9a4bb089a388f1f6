"""Grafting: the natural-gradient direction with Adam's per-layer step length.

The KL-clip's trust region ``η² gᵀF⁻¹g ≤ κ`` binds on nearly every step of a minibatch natural
gradient, because ``gᵀF⁻¹g`` is dominated by gradient noise, ``≈ d_eff(λ) / N`` for ``N``
samples (or positions) and the effective dimension ``d_eff(λ) = Σ_i f_i / (f_i + λ)`` of the
damped Fisher: a fixed κ that suits a small classifier clips a larger model on every step, and
the learning rate stops mattering (docs/DESIGN.md, "Step size"). Grafting (Agarwal et al.
2020, "Disentangling adaptive gradient methods from learning rates") takes the step's *length*
from a well-tuned first-order method instead and keeps only the *direction* of the
preconditioned one. Per preconditioned layer ``ℓ`` (parameters ``p`` of the layer, Adam moments
on the gradient ``g = ∇ + wd · p``)::

    m ← β₁ m + (1 − β₁) g,   v ← β₂ v + (1 − β₂) g²,   m̂ = m / (1 − β₁ᵗ),  v̂ = v / (1 − β₂ᵗ)
    a_ℓ = m̂ / (√v̂ + ε)                         (Adam's step of the layer)
    D_ℓ = (A ⊗ G + λ I)⁻¹ vec(m̂)                (natural direction of the first moment)
    Δ_ℓ = −η · (‖a_ℓ‖ / ‖D_ℓ‖) · D_ℓ

Parameters outside preconditioned layers (and layers whose curvature is not ready yet) take
Adam's step ``−η a``. So ``η`` has Adam's units (≈ 1e-3 … 1e-2) and decides every step; there is
no KL-clip (``kl_clip`` must be ``None``) and no heavy-ball momentum (``momentum`` must be 0: β₁
is the momentum).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .hyper import adam_moments
from .update import solve_layers

if TYPE_CHECKING:  # pragma: no cover
    from .kfac import KFAC


@dataclasses.dataclass(frozen=True)
class GraftOptions:
    """Options of Adam grafting (``natgrad.KFAC(graft=...)``).

    Args:
        betas: Adam's ``(β₁, β₂)``, each in ``[0, 1)``.
        eps: Adam's ε (> 0).
    """

    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", adam_moments("graft", self.betas, self.eps))

    @classmethod
    def coerce(cls, value: Any) -> GraftOptions | None:
        """``None`` (no grafting), ``"adam"`` (defaults), a dict of options, or options."""
        if value is None or isinstance(value, cls):
            return value
        if value == "adam":
            return cls()
        if isinstance(value, dict):
            unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ValueError(f"invalid graft options {sorted(unknown)}: accepted: "
                                 "['betas', 'eps']")
            return cls(**value)
        raise ValueError(f"invalid graft={value!r}: expected None, 'adam', a dict of "
                         "{'betas', 'eps'} or natgrad.optim.GraftOptions")


def adam_steps(opt: KFAC, hp: dict[str, Any], options: GraftOptions
               ) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """Update every parameter's Adam moments; return ``id(p) →`` Adam's step ``a`` and
    ``id(p) →`` the bias-corrected first moment ``m̂``."""
    b1, b2 = options.betas
    steps: dict[int, Tensor] = {}
    firsts: dict[int, Tensor] = {}
    for g, ghp in zip(opt.param_groups, hp["groups"]):
        for p in g["params"]:
            if p.grad is None:
                continue
            d = p.grad if ghp["weight_decay"] == 0 else p.grad.add(p, alpha=ghp["weight_decay"])
            state = opt.state[p]
            if "graft_exp_avg" not in state:
                state["graft_exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["graft_exp_avg_sq"] = torch.zeros_like(p,
                                                             memory_format=torch.preserve_format)
                state["graft_step"] = 0
            state["graft_step"] += 1
            t = state["graft_step"]
            m, v = state["graft_exp_avg"], state["graft_exp_avg_sq"]
            m.mul_(b1).add_(d, alpha=1 - b1)
            v.mul_(b2).addcmul_(d, d, value=1 - b2)
            m_hat = m / (1 - b1 ** t)
            steps[id(p)] = m_hat / (v / (1 - b2 ** t)).sqrt_().add_(options.eps)
            firsts[id(p)] = m_hat
    return steps, firsts


def grafted_step(opt: KFAC, hp: dict[str, Any], layer_group: dict[str, int],
                 grad_norms: dict[int, Tensor]) -> None:
    """One grafted step (module docstring): ``p -= η · Δ`` for every parameter."""
    steps, firsts = adam_steps(opt, hp, opt.graft)
    if opt.precondition:
        for name, D in solve_layers(opt, firsts, hp, layer_group, grad_norms).items():
            helper = opt.layers[name]
            dense = D.dense()
            a2 = sum(steps[id(p)].square().sum() for p in helper.params)
            d2 = dense.square().sum()
            scale = torch.where(d2 > 0, (a2 / d2).sqrt(), torch.zeros_like(d2))
            for p, d in zip(helper.params, helper.split_matrix(dense)):
                steps[id(p)] = d.mul(scale).to(p.dtype)
    for g, ghp in zip(opt.param_groups, hp["groups"]):
        for p in g["params"]:
            a = steps.get(id(p))
            if a is not None:
                p.add_(a, alpha=-ghp["lr"])
