"""Stochastic Lanczos quadrature (Ubaru et al. 2017; Ghorbani et al. 2019): spectral density,
``log det(F + λI)``, effective dimension — any ``tr f(F)`` — from one set of Lanczos runs."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .base import LinearOperator
from .lanczos import tridiagonalize
from .results import Estimate, Quadrature, SpectralDensity
from .trace import rademacher


def quadrature(op: LinearOperator, probes: int = 4, steps: int = 40, seed: int = 0,
               batch: int = 4, runs: Sequence[tuple[Tensor, Tensor]] = (),
               max_basis_bytes: int | None = None, reorthogonalize: bool = True) -> Quadrature:
    """Nodes and weights of ``probes`` Lanczos runs of ``steps`` steps.

    Up to ``batch`` fresh runs go together (one multi-column product per step); each keeps its
    ``(steps, P)`` basis for the reorthogonalisation, so ``max_basis_bytes`` caps
    ``batch · steps · P`` (at least one run at a time): on a 20M-parameter network four runs of
    40 steps would hold 12.8 GB of bases.

    ``reorthogonalize=False`` streams the runs: no basis is kept, three vectors of ``P`` per run
    (the three-term recurrence, :func:`~natgrad.fisher.lanczos.tridiagonalize`), and
    ``max_basis_bytes`` caps ``batch · 3 · P``. The nodes and weights keep their meaning — the
    Gauss quadrature of each probe's spectral measure ``Σ_i (u_iᵀv)² δ(λ_i)`` — but once Ritz
    values converge the recurrence repeats them ("ghost" nodes sharing the weight of one
    eigenvalue), so the nodes are not the Ritz values of an orthonormal basis; ``tr f(F)``
    and the density are as accurate to rounding (Greenbaum 1989; Chen, Trogdon & Ubaru 2021,
    "Analysis of stochastic Lanczos quadrature for spectrum approximation").

    ``runs``: tridiagonals ``(alpha, beta)`` of Lanczos runs already made from isotropic random
    start vectors (Gaussian, e.g. :attr:`Eigenpairs.alpha` / ``beta`` of
    :func:`~natgrad.fisher.lanczos.lanczos_topk`, or Rademacher), reused as probes (truncated to
    ``steps``; a shorter run that broke down is padded with zero weights); the other
    ``probes − len(runs)`` start from fresh Rademacher vectors.
    """
    gen = torch.Generator().manual_seed(seed)
    tridiagonals = [(a[:steps].double(), b[:max(steps - 1, 0)].double())
                    for a, b in list(runs)[:probes]]
    fresh = probes - len(tridiagonals)
    if max_basis_bytes is not None:
        vectors = steps if reorthogonalize else 3
        per_run = vectors * op.dim * torch.empty((), dtype=op.dtype).element_size()
        batch = max(1, min(batch, max_basis_bytes // max(per_run, 1)))
    for s in range(0, fresh, batch):
        V = rademacher(op.dim, min(batch, fresh - s), gen, op.dtype).to(op.device)
        if reorthogonalize:
            alpha, beta, _ = tridiagonalize(op, V, steps)
        else:
            alpha, beta, _ = tridiagonalize(op, V, steps, reorthogonalize=False)
        del V
        tridiagonals.extend(zip(alpha, beta))
    nodes, weights = _gauss(tridiagonals)
    half = (steps + 1) // 2
    coarse = _gauss([(a[:half], b[:max(half - 1, 0)]) for a, b in tridiagonals])
    return Quadrature(nodes, weights, op.dim, *coarse)


def _gauss(tridiagonals: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Gauss-quadrature nodes and weights of each tridiagonal, padded to the longest run."""
    width = max(a.numel() for a, _ in tridiagonals)
    nodes, weights = [], []
    for a, b in tridiagonals:
        T = torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1)
        theta, S = torch.linalg.eigh(T)
        pad = width - theta.numel()
        nodes.append(torch.cat([theta, theta[-1:].expand(pad)]))
        weights.append(torch.cat([S[0].pow(2), theta.new_zeros(pad)]))
    return torch.stack(nodes), torch.stack(weights)


def trace_function(quad: Quadrature, fn: Callable[[Tensor], Tensor]) -> Estimate:
    """``tr f(F) ≈ P · mean_i Σ_j τ_ij f(θ_ij)`` with its error.

    ``stderr`` is the spread across probes. It does not show the quadrature error of a short
    Lanczos run (with a log near a tiny damping, 5 steps leave a bias of many standard errors),
    so ``bias`` estimates that: the change of the estimate between the first ``⌈steps/2⌉`` steps
    and all ``steps`` of the same runs, an overestimate of the error left at ``steps`` (Gauss
    quadrature converges fast in the steps). ``Estimate.error = stderr + bias`` is the error
    bar to report (``tests/fisher/test_estimators.py`` checks that it covers the true value)."""
    per_probe = quad.dim * (quad.weights * fn(quad.nodes)).sum(1)
    if quad.exact:  # the whole spectrum (natgrad.fisher.dual): no probes, no quadrature error
        return Estimate(float(per_probe.sum()), 0.0, 0, exact=True)
    n = per_probe.numel()
    se = float(per_probe.std()) / math.sqrt(n) if n > 1 else math.inf
    value = float(per_probe.mean())
    bias = 0.0
    if quad.coarse_nodes is not None:
        coarse = quad.dim * (quad.coarse_weights * fn(quad.coarse_nodes)).sum(1)
        bias = abs(value - float(coarse.mean()))
    return Estimate(value, se, n, bias=bias)


def _quad(op: LinearOperator | None, quad: Quadrature | None, **kw) -> Quadrature:
    if quad is None:
        if op is None:
            raise ValueError("pass an operator or a precomputed quadrature")
        quad = quadrature(op, **kw)
    return quad


def slq_logdet(op: LinearOperator | None = None, damping: float = 1e-3,
               quad: Quadrature | None = None, **kw) -> Estimate:
    """``log det(F + λ I)`` by SLQ (``λ > 0``); Ritz values are clamped at 0 (F is PSD)."""
    if damping <= 0:
        raise ValueError(f"damping must be positive for log det, got {damping}")
    return trace_function(_quad(op, quad, **kw), lambda t: torch.log(t.clamp_min(0) + damping))


def effective_dimension(op: LinearOperator | None = None, z: float = 1e-3,
                        quad: Quadrature | None = None, **kw) -> Estimate:
    """``Σ_i λ_i / (λ_i + z)`` by SLQ."""
    if z <= 0:
        raise ValueError(f"z must be positive, got {z}")
    return trace_function(_quad(op, quad, **kw), lambda t: t.clamp_min(0) / (t.clamp_min(0) + z))


def spectral_density(op: LinearOperator | None = None, grid: Tensor | None = None,
                     sigma: float | None = None, num_points: int = 512,
                     quad: Quadrature | None = None, log_grid: bool = False,
                     **kw) -> SpectralDensity:
    """The Gaussian-broadened density on ``grid`` (default: ``num_points`` points spanning the
    nodes; ``log_grid`` places them log-spaced over the positive nodes, ``σ`` relative there).

    ``φ(t) = mean_i Σ_j τ_ij N(t; θ_ij, σ²)``, ``σ`` default 1 % of the node range.
    """
    quad = _quad(op, quad, **kw)
    nodes, weights = quad.nodes.flatten(), quad.weights.flatten() / quad.nodes.shape[0]
    if log_grid:
        pos = nodes.clamp_min(nodes.max() * 1e-12 + 1e-300)
        x = pos.log10()
        lo, hi = float(x.min()), float(x.max())
        pad = 0.05 * (hi - lo + 1e-12)
        g = torch.linspace(lo - pad, hi + pad, num_points, dtype=torch.float64) if grid is None \
            else grid.double().log10()
        s = sigma or 0.01 * (hi - lo + 1e-12)
        dens = (weights * torch.exp(-0.5 * ((g[:, None] - x) / s) ** 2)).sum(1) / (
            s * math.sqrt(2 * math.pi))
        return SpectralDensity(10 ** g, dens, s, quad)
    lo, hi = float(nodes.min()), float(nodes.max())
    pad = 0.05 * (hi - lo + 1e-12)
    g = torch.linspace(lo - pad, hi + pad, num_points, dtype=torch.float64) if grid is None \
        else grid.double()
    s = sigma or 0.01 * (hi - lo + 1e-12)
    dens = (weights * torch.exp(-0.5 * ((g[:, None] - nodes) / s) ** 2)).sum(1) / (
        s * math.sqrt(2 * math.pi))
    return SpectralDensity(g, dens, s, quad)
