"""Dense references built with ``torch.func.jacrev`` (tests and tiny models only).

A tensor input ``X`` and flat outputs ``(N, C)`` only (``mse`` / ``bce`` outputs of any shape,
read elementwise); ``cross_entropy`` with positions (sequence logits ``(N, T, V)``) is refused:
``ExactFisher(model, (X, y)).to_dense()`` is the reference for those (it is checked against a
per-position ``jacrev`` reference in ``tests/fisher/test_sequence_operators.py``)."""

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


def _check_flat(model: nn.Module, X: Tensor, loss: str) -> None:
    """``ValueError`` for categorical outputs with positions, which the references here would
    read as one event over all positions (see the module docstring)."""
    if not get_likelihood(loss).categorical:
        return
    with torch.no_grad():
        shape = tuple(model(X[:1]).shape)
    if len(shape) > 2:
        raise ValueError(f"the dense references need outputs (N, C) for loss={loss!r}, got "
                         f"per-sample shape {shape[1:]}; use ExactFisher(model, (X, y))"
                         ".to_dense() for sequence logits")


def dense_ggn(model: nn.Module, X: Tensor, loss: str = "cross_entropy",
              factors: Tensor | None = None, params=None) -> Tensor:
    """``(1/N) Σ_n J_nᵀ B_nᵀ B_n J_n`` (``B_n`` default: the likelihood's Hessian square root)."""
    if factors is None:
        _check_flat(model, X, loss)
    out, J = output_jacobian(model, X, params)
    B = get_likelihood(loss).hessian_sqrt(out) if factors is None else factors
    BJ = torch.einsum("nrc,ncp->nrp", B, J)
    return torch.einsum("nrp,nrq->pq", BJ, BJ) / X.shape[0]


def layer_fisher_block(
    model: nn.Module, layer: nn.Module, X: Tensor, loss: str = "cross_entropy"
) -> Tensor:
    """Exact (type-2) Fisher block of one Linear/Conv2d layer in K-FAC's ordering.

    The coordinates are ``vec(V)`` (column-stacking) of the layer's matrix ``V = [W | b]`` of shape
    ``(d_G, d_A)``, so the block is directly comparable with ``torch.kron(A, G)``.

    Returns:
        ``(d_G d_A, d_G d_A)``.
    """
    from ..layers import helper_for

    helper, reason = helper_for(layer)
    if helper is None:
        raise ValueError(f"layer {type(layer).__name__} has no K-FAC helper ({reason})")
    _check_flat(model, X, loss)
    out, J = output_jacobian(model, X, helper.params)  # (N, C, P) in named_parameters order
    N, C = J.shape[:2]
    sizes = [p.numel() for p in helper.params]
    JV = _jac_matrix(list(torch.split(J, sizes, dim=2)), helper, N, C)
    BJ = get_likelihood(loss).hessian_sqrt(out) @ JV
    return torch.einsum("ncp,ncq->pq", BJ, BJ) / N


def _jac_matrix(parts: list[Tensor], helper, N: int, C: int) -> Tensor:
    """Per-(sample, output) Jacobians as column-stacked ``vec(V)``: ``(N, C, d_G d_A)``."""
    W = parts[0].reshape(N, C, helper.out_dim, -1)
    if len(parts) > 1:
        W = torch.cat([W, parts[1].reshape(N, C, helper.out_dim, 1)], dim=3)
    return W.transpose(2, 3).reshape(N, C, -1)


def kron_dense(A: Tensor, G: Tensor) -> Tensor:
    """``A ⊗ G`` acting on column-stacked ``vec(V)``, ``V`` of shape ``(d_G, d_A)``."""
    return torch.kron(A, G)


def vec(V: Tensor) -> Tensor:
    """Column-stacking vectorisation of a ``(d_G, d_A)`` matrix."""
    return V.T.reshape(-1)


def unvec(v: Tensor, rows: int) -> Tensor:
    """Inverse of :func:`vec`."""
    return v.reshape(-1, rows).T
