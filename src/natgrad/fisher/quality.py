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


def _estimate(x: Tensor) -> Estimate:
    n = x.numel()
    se = float(x.std()) / math.sqrt(n) if n > 1 else math.inf
    return Estimate(float(x.mean()), se, n)


def gaussian_probes(op: LinearOperator, probes: int, seed: int = 0) -> Tensor:
    """``(P, probes)`` standard normal probes from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(op.dim, probes, generator=gen, dtype=torch.float64).to(
        device=op.device, dtype=op.dtype)


def relative_error(op: LinearOperator, approx: LinearOperator, probes: int = 10,
                   seed: int = 0, V: Tensor | None = None, FV: Tensor | None = None) -> Estimate:
    """``‖(F − F̃) v‖ / ‖F v‖`` over Gaussian probes ``v``: mean ± stderr.

    ``V``, ``FV``: reuse probes and their exact products.
    """
    V = gaussian_probes(op, probes, seed) if V is None else V
    FV = (op @ V) if FV is None else FV
    AV = (approx @ V.to(approx.dtype)).to(FV.dtype)
    return _estimate(((FV - AV).double().norm(dim=0) / FV.double().norm(dim=0)).cpu())


def subspace_overlap(U: Tensor, W: Tensor) -> float:
    """``‖Uᵀ W‖_F² / k`` for orthonormal ``(P, k)`` bases: 1 = same subspace, ≈ k/P at random."""
    k = min(U.shape[1], W.shape[1])
    return float((U.double().T @ W.double()).pow(2).sum() / k)


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
    """
    V = gaussian_probes(op, probes, seed) if V is None else V.to(op.dtype)
    probes = V.shape[1]
    masks = []
    for g in groups:
        m = torch.zeros(op.dim, dtype=torch.bool, device=op.device)
        for i in g:
            m[op.offsets[i]:op.offsets[i + 1]] = True
        masks.append(m)
    count = torch.stack(masks).sum(0) if masks else torch.zeros(op.dim, dtype=torch.long)
    disjoint = bool((count <= 1).all())
    rest = count == 0
    extra = [V * rest[:, None]] if disjoint and bool(rest.any()) else []
    if not disjoint:
        extra = [V]
    out = op @ torch.cat([V * m[:, None] for m in masks] + extra, dim=1)
    parts = out.split(probes, dim=1)
    DV = torch.zeros_like(V)
    for m, part in zip(masks, parts):
        DV[m] = part[m]
    FV = parts[-1] if not disjoint else sum(parts[1:], parts[0].clone())
    return BlockProducts(V, FV, DV, tuple(tuple(g) for g in groups))


def coupling_strength(bp: BlockProducts) -> Estimate:
    """Fraction of ``‖F v‖²`` from the off-diagonal blocks: ``‖F v − D v‖² / ‖F v‖²``."""
    num = (bp.FV - bp.DV).double().pow(2).sum(0)
    return _estimate((num / bp.FV.double().pow(2).sum(0)).cpu())


def block_relative_error(op: LinearOperator, bp: BlockProducts, block: int,
                         approx: LinearOperator) -> Estimate:
    """``‖(F_ℓℓ − F̃_ℓℓ) v_ℓ‖ / ‖F_ℓℓ v_ℓ‖`` for block ``block`` of ``bp`` (F̃ is applied to the
    masked probes, so any block-diagonal or full approximation works)."""
    m = torch.zeros(op.dim, dtype=torch.bool, device=op.device)
    for i in bp.groups[block]:
        m[op.offsets[i]:op.offsets[i + 1]] = True
    Vm = bp.V * m[:, None]
    AV = (approx @ Vm.to(approx.dtype)).to(bp.DV.dtype)[m]
    F = bp.DV[m]
    return _estimate(((F - AV).double().norm(dim=0) / F.double().norm(dim=0)).cpu())
