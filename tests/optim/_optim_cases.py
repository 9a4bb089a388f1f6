"""Shared pieces of the optimizer tests that compare a step with a dense reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def norm_mlp() -> nn.Module:
    """Linear → LayerNorm → Tanh → Linear: two Kronecker layers and a norm layer."""
    return nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3))


def step_with_grads(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
                    y: torch.Tensor) -> dict[str, torch.Tensor]:
    """One cross-entropy step of ``opt``; returns the gradients it used (by parameter name)."""
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    return grads
