"""Dense references built with ``torch.func.jacrev`` (tests and tiny models only)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from ..likelihoods import get_likelihood
from ._model import select_params


def output_jacobian(model: nn.Module, X: Tensor, params=None) -> tuple[Tensor, Tensor]:
    """Outputs ``(N, C)`` and the Jacobian ``(N, C, P)`` w.r.t. the selected parameters."""
    selected = select_params(model, params)
    names = [n for n, _ in selected]
    base = {n: p.detach() for n, p in model.named_parameters()}
    base.update(dict(model.named_buffers()))

    def f(*ps: Tensor) -> Tensor:
        return functional_call(model, {**base, **dict(zip(names, ps))}, (X,)).flatten(1)

    jac = jacrev(f, argnums=tuple(range(len(names))))(*[p.detach() for _, p in selected])
    J = torch.cat([j.reshape(X.shape[0], j.shape[1], -1) for j in jac], dim=2)
    with torch.no_grad():
        out = f(*[p.detach() for _, p in selected])
    return out, J


def dense_ggn(model: nn.Module, X: Tensor, loss: str = "cross_entropy",
              factors: Tensor | None = None, params=None) -> Tensor:
    """``(1/N) Σ_n J_nᵀ B_nᵀ B_n J_n`` (``B_n`` default: the likelihood's Hessian square root)."""
    out, J = output_jacobian(model, X, params)
    B = get_likelihood(loss).hessian_sqrt(out) if factors is None else factors
    BJ = torch.einsum("nrc,ncp->nrp", B, J)
    return torch.einsum("nrp,nrq->pq", BJ, BJ) / X.shape[0]
