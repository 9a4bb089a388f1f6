"""The K-FAC approximation as an operator: block diagonal over layers, ``A_ℓ ⊗ G_ℓ`` per block.

Built from a :class:`~natgrad.curvature.KroneckerCurvature` — the *same* curvature object the
optimizer uses, with the same layer rule and the same factor strategies (eigh, cholesky, projected,
recursive or any registered one):

* :meth:`KFACOperator.from_optimizer` — the curvature of a :class:`natgrad.KFAC` instance, as it
  is represented now (spectral strategies: as of their last refresh), or
* :meth:`KFACOperator.from_data` — fresh factors from one pass over the data with the analysis'
  capture (:mod:`natgrad.curvature.data`): ``A = (1/N) Σ ā āᵀ``, ``G = (1/(N T)) Σ g gᵀ`` where
  the ``g`` are the output directions of the matching Fisher (``"exact"``: ``R = C`` rows of the
  Hessian square root, exact for one datum through linear layers; ``"mc"``; ``"empirical"``)
  pulled back to the layer outputs.

Products use each block's own matvec: no Kronecker product is ever formed. Parameters outside
every preconditioned layer get a **zero** block (listed in :attr:`KFACOperator.uncovered`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..blocks import CurvatureBlock
from ..curvature import (
    Gram,
    KroneckerCurvature,
    Registration,
    StatisticSums,
    data_statistics,
    discover,
    pullbacks,
)
from ..factors import KroneckerFactor
from ..layers import LayerHelper
from ..likelihoods import get_likelihood
from ._model import Data, check_deterministic, select_params
from .base import LinearOperator
from .layer_diagonal import ggn_layer_traces, recognised_layers
from .rows import RowFisher


def layer_map(op: KFACOperator, V: Tensor, fn: Callable[[str, Tensor], Tensor],
              rest: float = 0.0) -> Tensor:
    """Apply ``fn(layer, M)`` to each layer's ``(d_G, d_A)`` matrix ``M = [W | b]`` of every
    column of ``V`` ``(P, k)`` (the flat order of ``op``), and ``rest · v`` to the parameters
    outside every layer of ``op``; returns ``(P, k)``. ``fn`` must be linear: a zero block
    (e.g. a probe masked to another layer) is left zero without calling it."""
    out = torch.zeros_like(V)
    covered: set[int] = set()
    for name, helper in op.layers.items():
        idx = op._index[name]
        covered.update(idx)
        for j in range(V.shape[1]):
            parts = [V[op.offsets[i]:op.offsets[i + 1], j].reshape(op.shapes[i]) for i in idx]
            if not any(bool(t.any()) for t in parts):
                continue
            R = fn(name, helper.grad_matrix(parts)).to(V.dtype)
            for i, t in zip(idx, helper.split_matrix(R)):
                out[op.offsets[i]:op.offsets[i + 1], j] = t.reshape(-1)
    if rest != 0.0:
        for i in range(len(op.names)):
            if i not in covered:
                out[op.offsets[i]:op.offsets[i + 1]] = rest * V[op.offsets[i]:op.offsets[i + 1]]
    return out


class KFACOperator(LinearOperator):
    """``blockdiag(A_ℓ ⊗ G_ℓ)`` over the layers of a curvature, zero elsewhere.

    Args:
        model: the network whose parameters define the flat order.
        layers: layer name → helper.
        blocks: layer name → curvature block (e.g. :class:`~natgrad.blocks.KroneckerBlock`), or
            ``(A, G)`` factor pairs.
        params: parameters the operator acts on (default: every trainable one).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: dict[str, LayerHelper],
        blocks: dict[str, Any],
        params: Sequence[Tensor] | Sequence[str] | None = None,
    ) -> None:
        from ..blocks import KroneckerBlock

        selected = select_params(model, params)
        p0 = selected[0][1]
        super().__init__([n for n, _ in selected], [p.shape for _, p in selected], p0.dtype,
                         p0.device)
        index = {id(p): i for i, (_, p) in enumerate(selected)}
        self.layers = {n: h for n, h in layers.items() if all(id(p) in index for p in h.params)}
        self.blocks: dict[str, CurvatureBlock] = {
            n: blocks[n] if isinstance(blocks[n], CurvatureBlock) else KroneckerBlock(*blocks[n])
            for n in self.layers}
        self._index = {n: [index[id(p)] for p in h.params] for n, h in self.layers.items()}
        covered = {i for idx in self._index.values() for i in idx}
        self.uncovered = [n for i, n in enumerate(self.names) if i not in covered]

    @property
    def factors(self) -> dict[str, tuple[KroneckerFactor, ...]]:
        """Layer name → the block's factors (``(A, G)``)."""
        return {n: b.factors for n, b in self.blocks.items()}

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_curvature(cls, curvature: KroneckerCurvature,
                       params: Sequence[Tensor] | None = None) -> KFACOperator:
        """The operator of a curvature's current blocks."""
        return cls(curvature.model, curvature.layers, curvature.blocks, params)

    @classmethod
    def from_optimizer(cls, optimizer: Any, params: Sequence[Tensor] | None = None
                       ) -> KFACOperator:
        """The operator of a :class:`natgrad.KFAC` optimizer's current factors."""
        return cls.from_curvature(optimizer.curvature, params)

    @classmethod
    def from_data(
        cls,
        model: nn.Module,
        data: Data,
        loss: str = "cross_entropy",
        fisher: str = "exact",
        strategy: str = "eigh",
        factor_options: Any = None,
        chunk_size: int = 256,
        mc_samples: int = 1,
        seed: int = 0,
        output_key: str | int | None = None,
    ) -> KFACOperator:
        """Fresh factors of ``strategy`` from one pass over ``data`` (see the module docstring).

        The statistics are summed in float64 once per layer and side (:class:`natgrad.curvature.
        Gram`); strategies that accept a dense moment (``supports_moment``) get ``Σ XᵀX``
        directly, with no square root of it taken (an ``O(d³)`` eigendecomposition per factor
        otherwise)."""
        layers, stats, num_samples = layer_statistics(
            model, data, loss, fisher, chunk_size, mc_samples, seed, output_key)
        return cls.from_statistics(model, layers, stats, num_samples, strategy, factor_options)

    @classmethod
    def from_stream(
        cls,
        model: nn.Module,
        data: Data,
        loss: str = "cross_entropy",
        fisher: str = "exact",
        strategy: str = "projected",
        factor_options: Any = None,
        chunk_size: int = 256,
        mc_samples: int = 1,
        seed: int = 0,
        output_key: str | int | None = None,
    ) -> KFACOperator:
        """The factors of :meth:`from_data` (``A = (1/N) Σ ā āᵀ``, ``G = (1/(N T)) Σ g gᵀ``)
        with every chunk's rows folded into the factors as it comes — a running mean, chunk
        ``t`` of ``m_t`` samples entering with weight ``m_t / N_t`` — so that no ``d × d`` sum
        is ever formed: for ``projected`` factors of wide layers (memory ``O(d·r)`` per factor,
        each chunk one Rayleigh–Ritz update). Exact strategies (``eigh``) give the
        :meth:`from_data` factors up to rounding; ``projected`` ones their recursive rank-``r``
        compression, exact when the rank reaches the width."""
        from ..curvature import LayerStatistics

        check_deterministic(model)
        layers = discover(model, [p for p in model.parameters() if p.requires_grad]).layers
        curvature = KroneckerCurvature(
            model, [p for h in layers.values() for p in h.params], strategy=strategy,
            options=factor_options, registration=Registration(layers=dict(layers)))
        seen, used = 0, set()
        for m, _inputs, outputs, grads, records in pullbacks(
                model, layers, data, get_likelihood(loss), fisher, chunk_size=chunk_size,
                mc_samples=mc_samples, seed=seed, output_key=output_key):
            rows = {}
            for name, g in grads.items():
                helper, dtype = layers[name], curvature.blocks[name].factors[0].dtype
                T = helper.locations(outputs[name])
                rows[name] = LayerStatistics(
                    helper.a_rows(records[name]).to(dtype), helper.input_scale(m),
                    helper.g_rows(torch.stack(g), records[name]).to(dtype),
                    helper.output_grad_scale(m, T), m, a_diagonal=helper.diagonal_input)
            seen += m
            bad = curvature.update(rows, decay=1.0 - m / seen)
            if bad:
                raise FloatingPointError(f"non-finite curvature statistics in layers {bad}")
            used.update(rows)
        for name in used:
            for f in curvature.blocks[name].factors:
                if f.spectral:
                    f.refresh(0.0)
        return cls(model, {n: layers[n] for n in layers if n in used},
                   {n: curvature.blocks[n] for n in used})

    @classmethod
    def from_statistics(
        cls,
        model: nn.Module,
        layers: dict[str, LayerHelper],
        stats: dict[str, tuple[Tensor, Tensor, int]],
        num_samples: int,
        strategy: str = "eigh",
        factor_options: Any = None,
        release_statistics: bool = False,
    ) -> KFACOperator:
        """Factors of ``strategy`` from :func:`layer_statistics` output (shareable between
        strategies): per layer ``(Σ āāᵀ, Σ ggᵀ, T)`` as :class:`~natgrad.curvature.Gram` sums
        (or as rows ``R`` with ``RᵀR`` the sum).

        ``release_statistics``: free what only a later update would need once the factors are
        refreshed (the dense ``F`` of ``eigh`` factors, :meth:`EighFactor.release_statistics`);
        the operator is then read-only (what :func:`~natgrad.fisher.analysis.analyze` wants:
        one ``d × d`` matrix less per wide factor).

        The factors are made by the same :class:`~natgrad.curvature.KroneckerCurvature` as the
        optimizer's (same strategies, options and precision rule) and filled in one update."""
        from ..curvature import LayerStatistics
        from ..curvature.registration import Registration

        curvature = KroneckerCurvature(
            model, [p for h in layers.values() for p in h.params], strategy=strategy,
            options=factor_options, registration=Registration(layers=dict(layers)))
        rows = {}
        for name, (RA, RG, T) in stats.items():
            helper, block = layers[name], curvature.blocks[name]
            dtype = block.factors[0].dtype
            # a dense moment where every factor takes one (no square root needed), rows otherwise
            moment = isinstance(RA, Gram) and all(f.supports_moment for f in block.factors)
            a, g = (_side(RA, moment and not helper.diagonal_input), _side(RG, moment))
            rows[name] = LayerStatistics(a.to(dtype), helper.input_scale(num_samples),
                                         g.to(dtype), helper.output_grad_scale(num_samples, T),
                                         num_samples, a_moment=moment and not
                                         helper.diagonal_input, g_moment=moment,
                                         a_diagonal=helper.diagonal_input)
        curvature.update(rows, decay=0.0)
        for name in rows:
            for f in curvature.blocks[name].factors:
                if f.spectral:
                    f.refresh(0.0)
                    if release_statistics and hasattr(f, "release_statistics"):
                        f.release_statistics()
        return cls(model, {n: layers[n] for n in rows},
                   {n: curvature.blocks[n] for n in rows})

    # ------------------------------------------------------------------ products
    def _matmat(self, V: Tensor) -> Tensor:
        def apply(name: str, M: Tensor) -> Tensor:
            block = self.blocks[name]
            return block.matvec(M.to(block.factors[0].dtype))

        return layer_map(self, V, apply)

    def diagonal(self) -> Tensor:
        """``(P,)``: ``diag(A ⊗ G) = vec(diag G diag Aᵀ)`` per block, zero elsewhere."""
        out = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for name, helper in self.layers.items():
            D = self.blocks[name].diagonal().to(self.dtype)
            for i, t in zip(self._index[name], helper.split_matrix(D)):
                out[self.offsets[i]:self.offsets[i + 1]] = t.reshape(-1)
        return out

    def layer_factors(self) -> dict[str, tuple[KroneckerFactor, ...]]:
        """Layer name → ``(A, G)``."""
        return self.factors


def layer_statistics(
    model: nn.Module, data: Data, loss: str = "cross_entropy", fisher: str = "exact",
    chunk_size: int = 256, mc_samples: int = 1, seed: int = 0,
    output_key: str | int | None = None,
) -> tuple[dict[str, LayerHelper], dict[str, tuple[Tensor, Tensor, int]], int]:
    """``(layers, stats, N)`` for :meth:`KFACOperator.from_statistics` (one pass over data).

    The layers are those the optimizer would precondition (:func:`natgrad.curvature.discover`,
    all trainable parameters); the statistics come from :func:`natgrad.curvature.data_statistics`.
    """
    check_deterministic(model)
    layers = discover(model, [p for p in model.parameters() if p.requires_grad]).layers
    stats, n = data_statistics(model, layers, data, get_likelihood(loss), fisher,
                               chunk_size=chunk_size, mc_samples=mc_samples, seed=seed,
                               output_key=output_key)
    return layers, stats, n


def rows_and_statistics(
    op: Any, max_bytes: int | None = None,
) -> tuple[RowFisher | None, tuple[dict[str, LayerHelper], dict[str, tuple[Tensor, Tensor, int]],
                                   int] | None]:
    """:meth:`RowFisher.from_ggn` and :func:`layer_statistics` of the same data from **one**
    pass: the K-FAC statistics ``(Σ āāᵀ, Σ ggᵀ)`` are sums over the same layer inputs and the
    same output directions pulled back to the same layer outputs as the rows (``"exact"``: the
    Hessian square root; ``"mc"``: the labels drawn per chunk from ``seed + i``; ``"empirical"``),
    so they are fed the rows' pass (:class:`natgrad.curvature.StatisticSums`).

    Args:
        op: a :class:`~natgrad.fisher.ggn.GGNOperator` on every trainable parameter.
        max_bytes: the rows' budget, as for :meth:`RowFisher.from_ggn`.

    Returns:
        ``(rows, statistics)``: ``statistics`` is ``(layers, stats, N)`` as
        :func:`layer_statistics` would return them for ``(op.model, op.data, op.loss,
        op.fisher, op.chunk_size)`` (and the operator's ``mc_samples`` / ``seed``), or ``None``
        when the pass cannot serve them (rows over budget, a K-FAC layer the rows do not pull
        back to, an operator on a subset of the parameters); then call
        :func:`layer_statistics`.
    """
    model = op.model
    trainable = [p for p in model.parameters() if p.requires_grad]
    layers = discover(model, trainable).layers
    slots = recognised_layers(op)
    shared = (len(op.names) == len(trainable) and all(
        n in slots and slots[n].helper.module is h.module for n, h in layers.items()))
    if not shared:
        return RowFisher.from_ggn(op, max_bytes=max_bytes), None
    sums = StatisticSums(layers)
    rows = RowFisher.from_ggn(op, max_bytes=max_bytes, statistics=sums)
    if rows is None:
        return None, None
    stats, n = sums.result()
    return rows, (layers, stats, n)


def _side(stat: Any, moment: bool) -> Tensor:
    """A :class:`Gram` as its moment or its rows; rows as they are."""
    if not isinstance(stat, Gram):
        return stat
    return stat.moment() if moment else stat.root()


def layer_traces(ggn: Any, layers: dict[str, LayerHelper],
                 memory_elements: int = 1 << 24) -> dict[str, float]:
    """Exact ``tr F_ℓℓ = (1/N) Σ_n Σ_r ‖∂(B_n f_n)_r / ∂θ_ℓ‖²`` per layer, from one forward and
    ``R`` backward passes per chunk to the layer outputs (no per-sample gradients of all
    parameters): :func:`natgrad.fisher.layer_diagonal.ggn_layer_traces`. Needs an eval-mode
    model whose samples do not interact (checked by the operator)."""
    return ggn_layer_traces(ggn, layers, memory_elements)
