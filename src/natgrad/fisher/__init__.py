"""Matrix-free Fisher analysis: operators and estimators (DESIGN §2, §5).

Operators (:class:`LinearOperator` subclasses, ``@`` on ``(P,)``, ``(P, k)`` or per-parameter
lists, ``+``, scalar ``*``, ``to_scipy()``, ``block(name)``):

* :class:`ExactFisher` — type-2 Fisher / GGN, mean over samples;
* :class:`MCFisher` — Monte-Carlo Fisher with sampled labels;
* :class:`EmpiricalFisher` — data-label gradient outer products (not a Fisher in general);
* :class:`KFACOperator` — block-diagonal ``A ⊗ G`` from the optimizer's factor strategies;
* :class:`EKFACOperator` — K-FAC's eigenbasis with the exact Fisher diagonal in it (EK-FAC).

Damped inverses ``(M + λI)⁻¹`` are operators too (:mod:`natgrad.fisher.inverse`):
:class:`KFACInverse` and :meth:`EKFACOperator.inverse` in closed form, :class:`CGInverse` by
conjugate gradients on any operator, :func:`damped_inverse` picks one. A Laplace posterior on the
K-FAC operator in factored form (samples, evidence, predictive) is :class:`KroneckerLaplace`
(:mod:`natgrad.fisher.posterior`).

Estimators are free functions accepting any operator; they return frozen dataclasses
(:mod:`natgrad.fisher.results`). Dense ``torch.func`` references live in
:mod:`natgrad.fisher.dense`.
"""

from .base import IdentityOperator, LinearOperator, RestrictedOperator
from .diagonal import exact_diagonal, hutchinson_diagonal
from .ekfac import EKFACInverse, EKFACOperator
from .ggn import EmpiricalFisher, ExactFisher, GGNOperator, MCFisher
from .inverse import CGInfo, CGInverse, KFACInverse, damped_inverse
from .kfac import KFACOperator
from .kron import (
    kfac_logdet,
    kfac_top_eigenvalues,
    kfac_trace,
    kron_logdet,
    kron_top_eigenvalues,
    kron_trace,
)
from .lanczos import condition_number, lanczos_topk, tridiagonalize
from .posterior import KroneckerLaplace
from .quality import (
    block_products,
    block_relative_error,
    coupling_strength,
    relative_error,
    subspace_overlap,
)
from .results import DiagonalEstimate, Eigenpairs, Estimate, Quadrature, SpectralDensity
from .slq import effective_dimension, quadrature, slq_logdet, spectral_density, trace_function
from .trace import exact_trace, hutchinson_trace, hutchpp_trace

FisherOperator = LinearOperator

__all__ = [
    "CGInfo", "CGInverse", "EKFACInverse", "EKFACOperator", "KFACInverse", "damped_inverse",
    "DiagonalEstimate", "Eigenpairs", "EmpiricalFisher", "Estimate", "ExactFisher",
    "FisherOperator", "GGNOperator", "IdentityOperator", "KFACOperator", "KroneckerLaplace",
    "LinearOperator",
    "MCFisher", "Quadrature", "RestrictedOperator", "SpectralDensity", "block_products",
    "block_relative_error", "condition_number", "coupling_strength", "effective_dimension",
    "exact_diagonal", "exact_trace", "hutchinson_diagonal", "hutchinson_trace", "hutchpp_trace",
    "kfac_logdet", "kfac_top_eigenvalues", "kfac_trace", "kron_logdet", "kron_top_eigenvalues",
    "kron_trace", "lanczos_topk", "quadrature", "relative_error", "slq_logdet",
    "spectral_density", "subspace_overlap", "trace_function", "tridiagonalize",
]
