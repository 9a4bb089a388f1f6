"""Frozen result types: every estimate carries its uncertainty and convergence information."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass(frozen=True)
class Estimate:
    """A scalar estimate.

    Attributes:
        value: the estimate.
        stderr: its standard error (``0.0`` for exact values).
        samples: probes / matrix-vector products it used (``0`` for closed forms).
        exact: whether ``value`` is exact up to rounding.
        bias: an estimate of the systematic error the probes' spread does not show (SLQ: the
            quadrature error, see :func:`natgrad.fisher.slq.trace_function`); :attr:`error`
            is the error bar that covers both.
    """

    value: float
    stderr: float = 0.0
    samples: int = 0
    exact: bool = False
    bias: float = 0.0

    @property
    def error(self) -> float:
        """The error bar: ``stderr + bias`` (``bias`` bounds a systematic error such as the
        quadrature error of stochastic Lanczos quadrature; 0 when there is none)."""
        return self.stderr + self.bias


@dataclass(frozen=True)
class DiagonalEstimate:
    """``value`` and elementwise ``stderr``, both ``(P,)`` (``stderr`` zero when exact)."""

    value: Tensor
    stderr: Tensor
    samples: int = 0
    exact: bool = False


@dataclass(frozen=True)
class Eigenpairs:
    """Top-``k`` eigenpairs from Lanczos.

    Attributes:
        values: ``(k,)`` descending.
        vectors: ``(P, k)`` orthonormal Ritz vectors.
        residuals: ``(k,)`` relative residuals ``‖F v − θ v‖ / |θ|`` (from true products).
        converged: every residual ``≤ tol``.
        steps: Lanczos steps (= products with the operator, plus ``k`` for the residuals).
        tol: the tolerance used.
        smallest_ritz: the smallest Ritz value of the run.
        alpha, beta: the run's tridiagonal ``(m,)``, ``(m − 1,)`` (float64); its start vector is
            an isotropic random vector, so it doubles as one stochastic Lanczos quadrature probe
            (:func:`natgrad.fisher.slq.quadrature`, ``runs=``).
    """

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    converged: bool
    steps: int
    tol: float
    smallest_ritz: float = float("nan")
    alpha: Tensor | None = field(default=None, repr=False)
    beta: Tensor | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Quadrature:
    """Stochastic Lanczos quadrature: per probe ``i`` nodes ``θ_{ij}`` and weights ``τ_{ij}``.

    ``tr f(F) ≈ P · mean_i Σ_j τ_{ij} f(θ_{ij})``. ``nodes``, ``weights``: ``(probes, steps)``;
    ``coarse_nodes``, ``coarse_weights``: the same from the first ``⌈steps/2⌉`` Lanczos steps of
    the same runs (the quadrature-error estimate). ``exact``: one row holding the whole
    spectrum (:func:`natgrad.fisher.dual.exact_quadrature`): ``tr f(F)`` from it is exact.
    """

    nodes: Tensor
    weights: Tensor
    dim: int
    coarse_nodes: Tensor | None = None
    coarse_weights: Tensor | None = None
    exact: bool = False


@dataclass(frozen=True)
class SpectralDensity:
    """Gaussian-broadened spectral density ``φ(t) = (1/P) Σ_i δ(t − λ_i) * N(0, σ²)``.

    ``grid``, ``density``: ``(G,)``; ``density`` integrates to ~1 over the grid.
    """

    grid: Tensor
    density: Tensor
    sigma: float
    quadrature: Quadrature = field(repr=False)
