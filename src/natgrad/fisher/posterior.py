"""A Kronecker-factored Laplace posterior that never forms a ``P × k`` or ``d × d`` matrix.

For a network trained to ``θ*`` on ``N`` samples the Laplace approximation is
``p(θ | D) ≈ N(θ*, Σ)`` with the posterior precision ``Σ⁻¹ = N·K + δ I``: ``K`` is natgrad's K-FAC
operator of the mean Fisher (block diagonal, ``A ⊗ G`` per layer) and ``δ`` the prior precision.
With each factor held as ``F = U diag(μ) Uᵀ + σ (I − U Uᵀ)`` — the rank-``r`` eigenbasis plus a
scaled identity of the ``projected`` strategy, or a full eigenbasis (``U`` square) — every function
of a layer's block is applied to its ``(d_G, d_A)`` matrix ``V`` in factored form
(:func:`kron_function`): with ``X = U_Gᵀ V``, ``Y = V U_A``, ``Z = U_Gᵀ V U_A`` and
``f`` applied to the eigenvalues of the four sub-blocks (both directions in the bases,
one of them in a complement, both in the complements)::

    f(A ⊗ G) V = c V + U_G [(d₂ − c) ∘ X] + [Y ∘ (d₃ − c)] U_Aᵀ + U_G [(C − d₂ − d₃ + c) ∘ Z] U_Aᵀ

with ``C = f(μ_G μ_Aᵀ)``, ``d₂ = f(μ_G σ_A)``, ``d₃ = f(σ_G μ_Aᵀ)``, ``c = f(σ_G σ_A)``:
``O(d_G d_A (r_G + r_A))`` per matrix. :class:`KroneckerLaplace` uses it for

* posterior samples ``θ* + Σ^{1/2} ε`` with ``Σ^{1/2} = (N·K + δ I)^{-1/2}`` per layer
  (:meth:`~KroneckerLaplace.sample`, :meth:`~KroneckerLaplace.predictive`: the average softmax
  over weight samples);
* ``log det(N·K + δ I)`` in closed form from the factors' eigenvalues with their
  multiplicities (``(r_A + 1)(r_G + 1)`` terms per layer), hence the log marginal likelihood
  ``log p(D | θ*) − ½ (δ ‖θ*‖² + log det(N·K + δI) − P log δ)`` and the prior precision chosen on
  a grid by it (:meth:`~KroneckerLaplace.select_prior_precision`).

Fit from data with :meth:`KroneckerLaplace.fit` (:meth:`KFACOperator.from_stream`: each chunk's
statistics folded into the factors as they come, memory ``O(d·r)`` per factor), or wrap any
:class:`KFACOperator` (e.g. an optimizer's). Covers the layers with Kronecker blocks (Linear,
Conv2d, Embedding); a model with parameters outside them (normalization layers, free
parameters) is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..blocks import KroneckerBlock
from ..curvature.data import count_samples, iter_chunks, model_args, to_model
from ._model import Data
from .base import LinearOperator
from .inverse import check_damping, spectral_view
from .kfac import KFACOperator, layer_map

LOSSES = ("cross_entropy", "mse")

__all__ = ["LOSSES", "KroneckerLaplace", "PosteriorRoot", "kron_function", "spectrum"]


def spectrum(factor: Any) -> tuple[Tensor, Tensor, float]:
    """``(U (d, r), μ (r,) float64, σ)`` of a factor: its eigenbasis (computed from its dense
    matrix for factors that keep none) and the value of its complement (0 when ``r = d``)."""
    U, mu, sig = spectral_view(factor).eigen()
    return U, mu.double().clamp_min(0), max(0.0, float(sig))


def kron_function(V: Tensor, A: tuple[Tensor, Tensor, float], G: tuple[Tensor, Tensor, float],
                  f: Callable[[Tensor], Tensor]) -> Tensor:
    """``f(A ⊗ G)`` applied to the ``(d_G, d_A)`` matrix ``V`` (module docstring), for ``A`` and
    ``G`` given by :func:`spectrum`; ``f`` maps float64 eigenvalues elementwise. Returns a new
    ``(d_G, d_A)`` tensor in ``V``'s dtype (one more matrix of ``V``'s size is allocated)."""
    (Ua, ma, sa), (Ug, mg, sg) = A, G
    Ua, Ug = Ua.to(V.dtype), Ug.to(V.dtype)
    ra, rg = Ua.shape[1] < Ua.shape[0], Ug.shape[1] < Ug.shape[0]  # a complement exists
    one = torch.ones((), dtype=torch.float64)
    c = float(f(one * sg * sa)) if (ra and rg) else 0.0
    d2 = f(mg * sa) if ra else None  # (r_G,): G's basis, A's complement
    d3 = f(sg * ma) if rg else None  # (r_A,): G's complement, A's basis
    C = f(torch.outer(mg, ma))  # (r_G, r_A)
    X = Ug.T @ V  # (r_G, d_A)
    Z = X @ Ua  # (r_G, r_A)
    W = C - (d2[:, None] if ra else 0.0) - (d3[None, :] if rg else 0.0) + c
    out = V * c if c != 0.0 else torch.zeros_like(V)
    if ra:  # U_G (d₂ − c) X, with X's part in A's basis removed by W
        out.addmm_(Ug, X * (d2 - c).to(V.dtype)[:, None])
    left = Ug @ (Z * W.to(V.dtype))  # (d_G, r_A)
    if rg:
        left += (V @ Ua) * (d3 - c).to(V.dtype)[None, :]
    return out.addmm_(left, Ua.T)


def _inv_sqrt(num_samples: int, delta: float) -> Callable[[Tensor], Tensor]:
    return lambda lam: (num_samples * lam + delta).rsqrt()


class PosteriorRoot(LinearOperator):
    """``(N·K + δ I)^{-1/2}`` (the posterior covariance's symmetric square root) of a
    :class:`KroneckerLaplace` as an operator on flat ``(P, k)`` vectors (for checks on small
    models; sampling works per layer and never flattens)."""

    def __init__(self, laplace: KroneckerLaplace) -> None:
        op = laplace.op
        super().__init__(op.names, op.shapes, op.dtype, op.device)
        self.laplace = laplace

    def _matmat(self, V: Tensor) -> Tensor:
        return layer_map(self.laplace.op, V, self.laplace.root_layer)


class KroneckerLaplace:
    """``N(θ*, (N·K + δ I)⁻¹)`` over a model's trainable parameters (module docstring).

    Args:
        model: the network at its MAP estimate ``θ*`` (its current parameters are the mean).
        op: the K-FAC operator of the mean Fisher over the ``N`` training samples, covering every
            trainable parameter with Kronecker blocks.
        num_samples: ``N``.
        prior_precision: ``δ > 0``.
        loss: ``"cross_entropy"`` (classification; predictive = mean softmax) or ``"mse"``
            (unit-variance Gaussian regression; predictive = mean output).
    """

    def __init__(self, model: nn.Module, op: KFACOperator, num_samples: int,
                 prior_precision: float = 1.0, loss: str = "cross_entropy") -> None:
        if not isinstance(op, KFACOperator):
            raise TypeError(f"op must be a KFACOperator, got {type(op).__name__}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        others = [n for n, b in op.blocks.items() if not isinstance(b, KroneckerBlock)]
        if others or op.uncovered:
            raise ValueError("KroneckerLaplace covers layers with Kronecker blocks only; no "
                             f"Kronecker block for layers {others} / parameters {op.uncovered}")
        self.model, self.op, self.num_samples, self.loss = model, op, num_samples, loss
        self.prior_precision = check_damping(prior_precision)
        self._spectra = {n: (spectrum(b.A), spectrum(b.G)) for n, b in op.blocks.items()}
        named = dict(model.named_parameters())
        self.params = [named[n] for n in op.names]
        self.mean = [p.detach().clone() for p in self.params]
        self._mean_sq: float | None = None  # ‖θ*‖², once asked for

    @classmethod
    def fit(cls, model: nn.Module, data: Data, loss: str = "cross_entropy",
            fisher: str = "exact", strategy: str = "projected", factor_options: Any = None,
            prior_precision: float = 1.0, chunk_size: int = 256, mc_samples: int = 1,
            seed: int = 0) -> KroneckerLaplace:
        """Fit from one pass over ``data`` (:meth:`KFACOperator.from_stream`; ``fisher``:
        ``"exact"``, ``"mc"`` or ``"empirical"``; ``strategy`` / ``factor_options``: the
        factors, e.g. ``"projected"`` with ``{"rank": 32}``)."""
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        check_damping(prior_precision)
        model.eval()
        op = KFACOperator.from_stream(model, data, loss, fisher, strategy, factor_options,
                                      chunk_size, mc_samples, seed)
        return cls(model, op, count_samples(data), prior_precision, loss)

    # ------------------------------------------------------------------ the covariance root
    def root_layer(self, name: str, M: Tensor, prior_precision: float | None = None) -> Tensor:
        """``(N·A⊗G + δ I)^{-1/2}`` of layer ``name`` on its ``(d_G, d_A)`` matrix ``M``."""
        delta = self.prior_precision if prior_precision is None else prior_precision
        A, G = self._spectra[name]
        dtype = self.op.blocks[name].A.dtype
        return kron_function(M.to(dtype), A, G, _inv_sqrt(self.num_samples, delta))

    def root(self) -> PosteriorRoot:
        """The posterior covariance's square root ``(N·K + δ I)^{-1/2}`` as an operator."""
        return PosteriorRoot(self)

    # ------------------------------------------------------------------ evidence
    def log_det_precision(self, prior_precision: float | None = None) -> float:
        """``log det(N·K + δ I)`` from the factors' eigenvalues and multiplicities."""
        delta = self.prior_precision if prior_precision is None else check_damping(
            prior_precision)
        total = 0.0
        for _name, (A, G) in self._spectra.items():
            va, ca = _values(A)
            vg, cg = _values(G)
            terms = torch.log(self.num_samples * torch.outer(vg, va) + delta)
            total += float((terms * torch.outer(cg, ca)).sum())
        return total

    def log_likelihood(self, data: Data, chunk_size: int = 256) -> float:
        """``log p(D | θ*)`` of the model at the mean: ``−Σ`` cross-entropy, or the
        unit-variance Gaussian ``−½ Σ ‖y − f‖² − (n·C/2) log 2π``."""
        total, count = 0.0, 0
        with _at(self.params, self.mean):
            for out, y in self._outputs(data, chunk_size):
                if y is None:
                    raise ValueError("data must carry labels for the log likelihood")
                if self.loss == "cross_entropy":
                    total -= float(nn.functional.cross_entropy(
                        out.double(), y.to(out.device), reduction="sum"))
                else:
                    r = out.double() - y.to(out).double().reshape(out.shape)
                    total -= 0.5 * float((r * r).sum())
                    count += r.numel()
        return total - 0.5 * count * math.log(2 * math.pi)

    def log_marginal_likelihood(self, log_likelihood: float,
                                prior_precision: float | None = None) -> float:
        """``log p(D | θ*) − ½ (δ ‖θ*‖² + log det(N·K + δ I) − P log δ)`` (the Laplace evidence
        with the prior ``N(0, δ⁻¹ I)``)."""
        delta = self.prior_precision if prior_precision is None else check_damping(
            prior_precision)
        if self._mean_sq is None:
            self._mean_sq = sum(float(torch.linalg.vector_norm(m, dtype=torch.float64) ** 2)
                                for m in self.mean)
        return log_likelihood - 0.5 * (delta * self._mean_sq + self.log_det_precision(delta)
                                       - self.op.dim * math.log(delta))

    def select_prior_precision(self, log_likelihood: float,
                               grid: Sequence[float] | None = None) -> float:
        """Set :attr:`prior_precision` to the grid value (default ``10^[-4, 4]``, 33 points)
        of largest :meth:`log_marginal_likelihood`, and return it."""
        grid = list(torch.logspace(-4, 4, 33).tolist() if grid is None else grid)
        if not grid:
            raise ValueError("grid must hold at least one prior precision")
        values = [check_damping(d) for d in grid]
        scores = [self.log_marginal_likelihood(log_likelihood, d) for d in values]
        self.prior_precision = values[max(range(len(values)), key=scores.__getitem__)]
        return self.prior_precision

    # ------------------------------------------------------------------ samples
    def sample(self, generator: torch.Generator | None = None) -> list[Tensor]:
        """One posterior sample ``θ* + (N·K + δ I)^{-1/2} ε`` (``ε ~ N(0, I)``), per parameter
        in :attr:`params` order; layer by layer, one ``(d_G, d_A)`` noise matrix at a time."""
        out: list[Tensor] = [torch.empty(0)] * len(self.params)
        for _name, idx, D in self._deltas(generator):
            for i, t in zip(idx, D):
                out[i] = self.mean[i] + t.reshape(self.mean[i].shape).to(self.mean[i].dtype)
        return out

    def _deltas(self, generator: torch.Generator | None) -> Iterable[tuple[str, list[int],
                                                                           list[Tensor]]]:
        for name, helper in self.op.layers.items():
            A, G = self.op.blocks[name].A, self.op.blocks[name].G
            eps = torch.randn(G.dim, A.dim, generator=generator, dtype=A.dtype,
                              device=self.op.device)
            D = self.root_layer(name, eps)
            del eps
            yield name, self.op._index[name], helper.split_matrix(D)

    @torch.no_grad()
    def predictive(self, data: Data, samples: int = 10, seed: int = 0,
                   chunk_size: int = 256, linearized: bool = False) -> Tensor:
        """The sampled predictive on ``data``'s inputs: the mean over ``samples`` weight samples
        ``θ = θ* + Δ`` of the softmax (``"cross_entropy"``) or of the output (``"mse"``),
        ``(n, C)``, of the network at ``θ`` or, ``linearized=True``, of its linearisation
        ``f(x, θ*) + J(x) Δ`` (one forward-mode product per chunk; the predictive of the
        generalised Gauss–Newton model the posterior belongs to). The weights are set in place
        one sample at a time and restored to the mean afterwards."""
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be a positive integer, got {samples!r}")
        gen = torch.Generator(device=self.op.device).manual_seed(seed)
        total: Tensor | None = None
        with _at(self.params, self.mean):
            for _ in range(samples):
                deltas: list[Tensor] = [torch.empty(0)] * len(self.params)
                for _name, idx, D in self._deltas(gen):
                    for i, t in zip(idx, D):
                        p = self.params[i]
                        if linearized:
                            deltas[i] = t.reshape(p.shape).to(p.dtype)
                        else:
                            p.copy_(self.mean[i]).add_(t.reshape(p.shape).to(p.dtype))
                    del D
                if linearized:
                    outs = [self._link(o) for o in self._linear_outputs(data, deltas,
                                                                         chunk_size)]
                else:
                    outs = [self._link(o) for o, _ in self._outputs(data, chunk_size)]
                del deltas
                probs = torch.cat(outs)
                total = probs if total is None else total.add_(probs)
        assert total is not None
        return total / samples

    def _linear_outputs(self, data: Data, deltas: list[Tensor],
                        chunk_size: int) -> Iterable[Tensor]:
        """``f(x, θ*) + J(x) Δ`` per chunk (forward-mode: ``torch.func.jvp``)."""
        names = list(self.op.names)
        p0 = self.params[0]
        for x, _ in iter_chunks(data, chunk_size):
            args, kwargs = model_args(to_model(x, p0.device, p0.dtype))

            def f(*theta: Tensor, args=args, kwargs=kwargs) -> Tensor:
                return torch.func.functional_call(self.model, dict(zip(names, theta)), args,
                                                  kwargs)

            out, tangent = torch.func.jvp(f, tuple(self.mean), tuple(deltas))
            yield out + tangent

    @torch.no_grad()
    def map_predictive(self, data: Data, chunk_size: int = 256) -> Tensor:
        """The MAP model's softmax (or output) on ``data``'s inputs, ``(n, C)``."""
        with _at(self.params, self.mean):
            return torch.cat([self._link(o) for o, _ in self._outputs(data, chunk_size)])

    def _link(self, out: Tensor) -> Tensor:
        return out.softmax(-1) if self.loss == "cross_entropy" else out

    def _outputs(self, data: Data, chunk_size: int) -> Iterable[tuple[Tensor, Tensor | None]]:
        p0 = self.params[0]
        for x, y in iter_chunks(data, chunk_size):
            args, kwargs = model_args(to_model(x, p0.device, p0.dtype))
            with torch.no_grad():
                yield self.model(*args, **kwargs), y


def _values(spec: tuple[Tensor, Tensor, float]) -> tuple[Tensor, Tensor]:
    """A factor's distinct eigenvalue groups: ``(values, multiplicities)`` (float64)."""
    U, mu, sig = spec
    d, r = U.shape
    if r == d:
        return mu, torch.ones_like(mu)
    return (torch.cat([mu, mu.new_tensor([sig])]),
            torch.cat([torch.ones_like(mu), mu.new_tensor([float(d - r)])]))


class _at:
    """Context: ``params`` hold ``values`` inside and are set back to them on exit."""

    def __init__(self, params: list[Tensor], values: list[Tensor]) -> None:
        self.params, self.values = params, values

    def __enter__(self) -> None:
        self._copy()

    def __exit__(self, *exc: Any) -> None:
        self._copy()

    def _copy(self) -> None:
        with torch.no_grad():
            for p, v in zip(self.params, self.values):
                p.copy_(v)
