"""The K-FAC approximation as an operator: block diagonal over layers, ``A_ℓ ⊗ G_ℓ`` per block.

Built from the *same* :class:`~natgrad.factors.KroneckerFactor` objects the optimizer uses
(any strategy: eigh, cholesky, projected, recursive), either

* :meth:`KFACOperator.from_optimizer` — the factors of a :class:`natgrad.KFAC` instance, as they
  are represented now (spectral strategies: as of their last refresh), or
* :meth:`KFACOperator.from_data` — fresh factors from one pass over the data, with the layer
  helpers' statistics (:mod:`natgrad.layers`): ``A = (1/N) Σ ā āᵀ``, ``G = (1/(N T)) Σ g gᵀ``
  where the ``g`` are the output-space factor rows ``B_n`` of the matching Fisher
  (``"type2"``: ``R = C`` backward passes, exact for one datum through linear layers; ``"mc"``;
  ``"empirical"``) pushed back to the layer outputs.

Products use :func:`natgrad.factors.kronecker_matvec`: no Kronecker product is ever formed.
Parameters outside every recognised layer get a **zero** block (listed in
:attr:`KFACOperator.uncovered`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..factors import STRATEGIES, KroneckerFactor, kronecker_matvec, make_factor
from ..layers import LayerHelper, helper_for
from ._model import Data, check_deterministic, select_params
from .base import LinearOperator
from .ggn import EmpiricalFisher, ExactFisher, GGNOperator, MCFisher
from .layer_diagonal import ggn_layer_traces

_FISHERS: dict[str, type[GGNOperator]] = {
    "type2": ExactFisher, "exact": ExactFisher, "mc": MCFisher, "empirical": EmpiricalFisher,
}


class KFACOperator(LinearOperator):
    """``blockdiag(A_ℓ ⊗ G_ℓ)`` over the layers, zero elsewhere.

    Args:
        model: the network whose parameters define the flat order.
        layers: layer name → helper.
        factors: layer name → ``(A, G)``.
        params: parameters the operator acts on (default: every trainable one).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: dict[str, LayerHelper],
        factors: dict[str, tuple[KroneckerFactor, KroneckerFactor]],
        params: Sequence[Tensor] | Sequence[str] | None = None,
    ) -> None:
        selected = select_params(model, params)
        p0 = selected[0][1]
        super().__init__([n for n, _ in selected], [p.shape for _, p in selected], p0.dtype,
                         p0.device)
        index = {id(p): i for i, (_, p) in enumerate(selected)}
        self.layers = {n: h for n, h in layers.items() if all(id(p) in index for p in h.params)}
        self.factors = {n: factors[n] for n in self.layers}
        self._index = {n: [index[id(p)] for p in h.params] for n, h in self.layers.items()}
        covered = {i for idx in self._index.values() for i in idx}
        self.uncovered = [n for i, n in enumerate(self.names) if i not in covered]

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_optimizer(cls, optimizer: Any, params: Sequence[Tensor] | None = None
                       ) -> KFACOperator:
        """The operator of a :class:`natgrad.KFAC` optimizer's current factors."""
        from ..optim.kfac import unwrap

        return cls(unwrap(optimizer.model), optimizer.layers, optimizer.factors, params)

    @classmethod
    def from_data(
        cls,
        model: nn.Module,
        data: Data,
        loss: str = "cross_entropy",
        fisher: str = "type2",
        strategy: str = "eigh",
        factor_options: dict[str, Any] | None = None,
        chunk_size: int = 256,
        mc_samples: int = 1,
        seed: int = 0,
    ) -> KFACOperator:
        """Fresh factors of ``strategy`` from one pass over ``data`` (see the module docstring).

        Strategies that accept a dense moment (``supports_moment``) get ``Σ XᵀX`` directly, with
        no square root of it taken (an ``O(d³)`` eigendecomposition per factor otherwise)."""
        moments = bool(getattr(STRATEGIES.get(strategy), "supports_moment", False))
        layers, stats, num_samples = layer_statistics(
            model, data, loss, fisher, chunk_size, mc_samples, seed, moments=moments
        )
        return cls.from_statistics(model, layers, stats, num_samples, strategy,
                                   factor_options, moments=moments)

    @classmethod
    def from_statistics(
        cls,
        model: nn.Module,
        layers: dict[str, LayerHelper],
        stats: dict[str, tuple[Tensor, Tensor, int]],
        num_samples: int,
        strategy: str = "eigh",
        factor_options: dict[str, Any] | None = None,
        moments: bool = False,
    ) -> KFACOperator:
        """Factors of ``strategy`` from :func:`layer_statistics` output (shareable between
        strategies): per layer ``(rows or square root of Σ āāᵀ, same for Σ ggᵀ, T)``, or with
        ``moments`` the dense ``(Σ āāᵀ, Σ ggᵀ, T)``."""
        factors = {}
        for name, (RA, RG, T) in stats.items():
            helper = layers[name]
            w = helper.module.weight
            opts = {"dtype": w.dtype, "device": w.device, **(factor_options or {})}
            A = _factor_from_rows(strategy, RA, helper.input_scale(num_samples), opts, moments)
            G = _factor_from_rows(strategy, RG, helper.output_grad_scale(num_samples, T), opts,
                                  moments)
            factors[name] = (A, G)
        return cls(model, layers, factors)

    # ------------------------------------------------------------------ products
    def _matmat(self, V: Tensor) -> Tensor:
        out = torch.zeros_like(V)
        for name, helper in self.layers.items():
            A, G = self.factors[name]
            idx = self._index[name]
            for j in range(V.shape[1]):
                parts = [V[self.offsets[i]:self.offsets[i + 1], j].reshape(self.shapes[i])
                         for i in idx]
                if not any(bool(t.any()) for t in parts):
                    continue  # a zero block (e.g. probes masked to another layer): zero result
                M = helper.grad_matrix(parts).to(A.dtype)
                R = kronecker_matvec(M, A, G).to(self.dtype)
                for i, t in zip(idx, helper.split_matrix(R)):
                    out[self.offsets[i]:self.offsets[i + 1], j] = t.reshape(-1)
        return out

    def diagonal(self) -> Tensor:
        """``(P,)``: ``diag(A ⊗ G) = vec(diag G diag Aᵀ)`` per block, zero elsewhere."""
        out = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for name, helper in self.layers.items():
            A, G = self.factors[name]
            D = torch.outer(G.to_dense().diagonal(), A.to_dense().diagonal()).to(self.dtype)
            for i, t in zip(self._index[name], helper.split_matrix(D)):
                out[self.offsets[i]:self.offsets[i + 1]] = t.reshape(-1)
        return out

    def layer_factors(self) -> dict[str, tuple[KroneckerFactor, KroneckerFactor]]:
        """Layer name → ``(A, G)``."""
        return dict(self.factors)


def _factor_from_rows(strategy: str, rows: Tensor, scale: float, opts: dict[str, Any],
                      moment: bool = False) -> KroneckerFactor:
    """A factor representing ``scale · rowsᵀ rows``, or ``scale · rows`` when ``moment`` (the
    dense ``(d, d)`` moment, for a strategy with ``supports_moment``)."""
    factor = make_factor(strategy, rows.shape[1], **opts)
    if moment:
        factor.update_moment(rows.to(opts["dtype"]), scale, decay=0.0)
    else:
        factor.update(rows.to(opts["dtype"]), scale, decay=0.0)
    if factor.spectral:
        factor.refresh(0.0)
    return factor


class _Gram:
    """``Σ XᵀX`` over batches as rows ``R`` (``RᵀR = Σ XᵀX``): the raw rows while there are at
    most ``d`` of them, then a ``(d, d)`` square root of the summed Gram matrix, accumulated in
    float64 (:func:`_gram64`; one float32 sum over the ~10⁶ rows of a conv layer's ``G`` was off
    by ~3e-5)."""

    def __init__(self) -> None:
        self.rows: list[Tensor] = []
        self.gram: Tensor | None = None
        self.dtype = torch.float32

    def add(self, X: Tensor) -> None:
        self.dtype = X.dtype
        if self.gram is None:
            self.rows.append(X)
            if sum(r.shape[0] for r in self.rows) <= X.shape[1]:
                return
            R = torch.cat(self.rows)
            self.rows = []
            self.gram = _gram64(R)
        else:
            self.gram += _gram64(X)

    def root(self) -> Tensor:
        if self.gram is None:
            return torch.cat(self.rows)
        lam, Q = torch.linalg.eigh(self.gram)
        return (Q * lam.clamp_min(0).sqrt()).T.to(self.dtype)

    def moment(self) -> Tensor:
        """``Σ XᵀX`` itself, ``(d, d)``."""
        if self.gram is None:
            return _gram64(torch.cat(self.rows)).to(self.dtype)
        return self.gram.to(self.dtype)


def _gram64(X: Tensor, block: int = 4096) -> Tensor:
    """``XᵀX`` in float64 from float32-speed products: one batched ``XᵀX`` per block of
    ``block`` rows, blocks summed in float64 (relative error ~1e-7 on 2·10⁵ rows, against
    ~4e-5 for one float32 product, at the float32 cost; a float64 product costs 2–3×)."""
    n, d = X.shape
    nb = n // block
    head = X[:nb * block].reshape(nb, block, d)
    out = torch.bmm(head.transpose(1, 2), head).double().sum(0) if nb else X.new_zeros(
        d, d, dtype=torch.float64)
    tail = X[nb * block:]
    return out + (tail.T @ tail).double()


def layer_statistics(
    model: nn.Module, data: Data, loss: str = "cross_entropy", fisher: str = "type2",
    chunk_size: int = 256, mc_samples: int = 1, seed: int = 0, moments: bool = False,
) -> tuple[dict[str, LayerHelper], dict[str, tuple[Tensor, Tensor, int]], int]:
    """``(layers, stats, N)`` for :meth:`KFACOperator.from_statistics` (one pass over data);
    ``moments``: dense ``Σ XᵀX`` instead of rows / square roots."""
    if fisher not in _FISHERS:
        raise ValueError(f"fisher={fisher!r} is not supported; accepted: {sorted(_FISHERS)}")
    check_deterministic(model)
    kwargs = {"mc_samples": mc_samples, "seed": seed} if fisher == "mc" else {}
    ggn = _FISHERS[fisher](model, data, loss, chunk_size=chunk_size, **kwargs)
    layers = {}
    for name, module in model.named_modules():
        helper, _ = helper_for(module)
        if helper is not None:
            layers[name] = helper
    return layers, _layer_sums(layers, ggn, moments), ggn.num_samples


def _layer_sums(
    layers: dict[str, LayerHelper], ggn: GGNOperator, moments: bool = False
) -> dict[str, tuple[Tensor, Tensor, int]]:
    """Per layer ``(R_A, R_G, T)`` with ``R_AᵀR_A = Σ āāᵀ`` and ``R_GᵀR_G = Σ ggᵀ``, ``g`` the
    rows of ``B_n`` pulled back to the layer output (``moments``: ``(Σ āāᵀ, Σ ggᵀ, T)``)."""
    sums: dict[str, list] = {}
    for chunk in ggn.pullbacks({n: h.module for n, h in layers.items()}):
        for n, a in chunk.inputs.items():
            helper = layers[n]
            T = helper.locations(torch.empty(chunk.shapes[n], device="meta"))
            s = sums.setdefault(n, [_Gram(), _Gram(), T])
            s[0].add(helper.input_rows(a))
        for grads in chunk.rows:
            for n, g in grads.items():
                sums[n][1].add(layers[n].output_grad_rows(g))
    out = (lambda g: g.moment()) if moments else (lambda g: g.root())
    return {n: (out(s[0]), out(s[1]), s[2]) for n, s in sums.items()
            if s[1].rows or s[1].gram is not None}


def layer_traces(ggn: GGNOperator, layers: dict[str, LayerHelper],
                 memory_elements: int = 1 << 24) -> dict[str, float]:
    """Exact ``tr F_ℓℓ = (1/N) Σ_n Σ_r ‖∂(B_n f_n)_r / ∂θ_ℓ‖²`` per layer, from one forward and
    ``R`` backward passes per chunk to the layer outputs (no per-sample gradients of all
    parameters): :func:`natgrad.fisher.layer_diagonal.ggn_layer_traces`. Needs an eval-mode
    model whose samples do not interact (checked by the operator)."""
    return ggn_layer_traces(ggn, layers, memory_elements)
