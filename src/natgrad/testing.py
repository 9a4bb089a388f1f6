"""Dense float64 references built with torch.func, for tests on tiny models (O(params²) memory)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from natgrad.layers import helper_for
from natgrad.likelihoods import get_likelihood


def layer_fisher_block(
    model: nn.Module, layer: nn.Module, x: Tensor, loss: str = "cross_entropy"
) -> Tensor:
    """Exact (type-2) Fisher block of ``layer`` w.r.t. ``vec([W | b])`` (column-stacking).

    ``F = (1/m) Σ_n J_nᵀ H_n J_n`` with ``J_n = ∂f(x_n)/∂vec(V)``; shape ``(d_G d_A, d_G d_A)``.
    """
    helper, _ = helper_for(layer)
    assert helper is not None
    names = {id(p): n for n, p in model.named_parameters()}
    keys = [names[id(p)] for p in helper.params]
    V0 = helper.grad_matrix([p.detach() for p in helper.params])

    def f(V: Tensor) -> Tensor:
        tensors = helper.split_matrix(V)
        return functional_call(model, dict(zip(keys, tensors)), (x,)).flatten(1)

    out = f(V0)
    J = jacrev(f)(V0)  # (m, C, d_G, d_A)
    J = J.transpose(-1, -2).reshape(J.shape[0], J.shape[1], -1)  # column-stacking vec
    B = get_likelihood(loss).hessian_sqrt(out.detach())  # (m, C, C)
    BJ = B @ J  # (m, C, P)
    return torch.einsum("ncp,ncq->pq", BJ, BJ) / x.shape[0]


def kron_dense(A: Tensor, G: Tensor) -> Tensor:
    """``A ⊗ G`` acting on column-stacked ``vec(V)``, ``V`` of shape ``(d_G, d_A)``."""
    return torch.kron(A, G)


def vec(V: Tensor) -> Tensor:
    """Column-stacking vectorisation."""
    return V.T.reshape(-1)


def unvec(v: Tensor, rows: int) -> Tensor:
    return v.reshape(-1, rows).T
