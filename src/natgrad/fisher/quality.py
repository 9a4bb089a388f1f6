"""How good is an approximation ``F̃`` of ``F``: relative errors on random probes, overlap of
top-``k`` eigenspaces, and the cross-layer coupling that any block-diagonal approximation drops."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import LinearOperator
from .results import Estimate


def _slices(n: int, rows: int = 1 << 18) -> list[slice]:
    """Row slices of at most ``rows`` rows: float64 work on ``(P, k)`` tensors a slice at a time
    (no float64 copy of a whole ``(P, k)`` tensor)."""
    return [slice(a, a + rows) for a in range(0, n, rows)]


def column_norms(X: Tensor, Y: Tensor | None = None) -> Tensor:
    """``‖X − Y‖`` per column (``‖X‖`` without ``Y``), summed in float64 slice by slice."""
    sq = torch.zeros(X.shape[1], dtype=torch.float64)
    for sl in _slices(X.shape[0]):
        D = X[sl].double() if Y is None else X[sl].double() - Y[sl].double()
        sq += D.pow(2).sum(0).cpu()
    return sq.sqrt()


def estimate(x: Tensor) -> Estimate:
    """Mean ± standard error of per-probe values ``x`` (``inf`` error for one probe)."""
    n = x.numel()
    se = float(x.std()) / math.sqrt(n) if n > 1 else math.inf
    return Estimate(float(x.mean()), se, n)


def gaussian_probes(op: LinearOperator, probes: int, seed: int = 0,
                    generator: torch.Generator | None = None) -> Tensor:
    """``(P, probes)`` standard normal probes from a seeded generator (or ``generator``, whose
    stream it advances: successive calls give further probes), drawn in float64 a slice of rows
    at a time and stored in the operator's dtype (no float64 copy of the whole block)."""
    gen = torch.Generator().manual_seed(seed) if generator is None else generator
    out = torch.empty(op.dim, probes, dtype=op.dtype, device=op.device)
    for sl in _slices(op.dim):
        rows = len(range(op.dim)[sl])
        out[sl] = torch.randn(rows, probes, generator=gen, dtype=torch.float64)
    return out


def relative_error(op: LinearOperator, approx: LinearOperator, probes: int = 10,
                   seed: int = 0, V: Tensor | None = None, FV: Tensor | None = None,
                   AV: Tensor | None = None) -> Estimate:
    """``‖(F − F̃) v‖ / ‖F v‖`` over Gaussian probes ``v``: mean ± stderr.

    ``V``, ``FV``, ``AV``: reuse probes and their exact and approximate products.
    """
    V = gaussian_probes(op, probes, seed) if V is None else V
    FV = (op @ V) if FV is None else FV
    AV = (approx @ V.to(approx.dtype) if AV is None else AV).to(FV.dtype)
    return estimate(column_norms(FV, AV) / column_norms(FV))


def subspace_overlap(U: Tensor, W: Tensor) -> float:
    """``‖Uᵀ W‖_F² / k`` for orthonormal ``(P, k)`` bases: 1 = same subspace, ≈ k/P at random."""
    k = min(U.shape[1], W.shape[1])
    G = sum(U[sl].double().T @ W[sl].double() for sl in _slices(U.shape[0]))
    return float(G.pow(2).sum() / k)


@dataclass(frozen=True)
class BlockProducts:
    """Products on shared probes: ``FV = F V`` and ``DV = blockdiag(F) V`` (``(P, probes)``)."""

    V: Tensor
    FV: Tensor
    DV: Tensor
    groups: tuple[tuple[int, ...], ...]


def block_products(op: LinearOperator, groups: Sequence[Sequence[int]], probes: int = 8,
                   seed: int = 0, V: Tensor | None = None) -> BlockProducts:
    """``F V`` and the block-diagonal part ``Σ_ℓ S_ℓ S_ℓᵀ F S_ℓ S_ℓᵀ V`` on Gaussian probes.

    ``groups``: parameter indices (into ``op.names``) per block; ``V``: probes to use instead.
    ``F V = Σ_ℓ F S_ℓ S_ℓᵀ V`` is assembled from the same products when the groups are disjoint
    (plus one column per probe for parameters outside every group), so the cost is
    ``L · probes`` products (``(L + 1) · probes`` with uncovered parameters).

    Memory: the products are made one block at a time and summed as they come, so besides
    ``V``, ``F V`` and ``D V`` (three ``(P, probes)`` tensors) one block's masked probes and
    product are alive (``2 · probes`` vectors of ``P``), whatever the number of blocks.
    """
    V = gaussian_probes(op, probes, seed) if V is None else V.to(op.dtype)
    claimed = [i for g in groups for i in g]
    disjoint = len(claimed) == len(set(claimed))
    rest = [i for i in range(len(op.names)) if i not in set(claimed)]
    DV = torch.zeros_like(V)
    FV = op @ V if not disjoint else torch.zeros_like(V)
    for g in list(groups) + ([rest] if disjoint and rest else []):
        m = _mask(op, g)
        part = op @ (V * m[:, None])
        if disjoint:
            FV += part
        if g is not rest:
            DV[m] = part[m]
        del part
    return BlockProducts(V, FV, DV, tuple(tuple(g) for g in groups))


def _mask(op: LinearOperator, indices: Sequence[int]) -> Tensor:
    """``(P,)`` bool: the flat positions of the parameters ``indices``."""
    m = torch.zeros(op.dim, dtype=torch.bool, device=op.device)
    for i in indices:
        m[op.offsets[i]:op.offsets[i + 1]] = True
    return m


def coupling_strength(bp: BlockProducts) -> Estimate:
    """Fraction of ``‖F v‖²`` from the off-diagonal blocks: ``‖F v − D v‖² / ‖F v‖²``."""
    return estimate((column_norms(bp.FV, bp.DV) / column_norms(bp.FV)).pow(2))


def block_relative_error(op: LinearOperator, bp: BlockProducts, block: int,
                         approx: LinearOperator, AV: Tensor | None = None) -> Estimate:
    """``‖(F_ℓℓ − F̃_ℓℓ) v_ℓ‖ / ‖F_ℓℓ v_ℓ‖`` for block ``block`` of ``bp`` (F̃ is applied to the
    masked probes, so any block-diagonal or full approximation works).

    ``AV``: ``F̃ V`` on the whole probes, for an ``F̃`` that is block diagonal over ``bp``'s
    groups (no coupling between the block and the other parameters): then its rows of the
    block are the product on the masked probes, and no product is made."""
    m = _mask(op, bp.groups[block])
    AV = (approx @ (bp.V * m[:, None]).to(approx.dtype) if AV is None else AV).to(
        bp.DV.dtype)[m]
    F = bp.DV[m]
    return estimate(column_norms(F, AV) / column_norms(F))
