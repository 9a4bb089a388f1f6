"""natgrad's curvature as a backend of laplace-torch (``laplace.Laplace(..., backend=...)``).

laplace-torch asks its backend, batch by batch, for the curvature of the **summed** negative
log-likelihood of the batch (and the batch loss): :meth:`NatgradInterface.full` (``P × P``),
:meth:`~NatgradInterface.kron` (a ``laplace.utils.Kron``), :meth:`~NatgradInterface.diag`
(``(P,)``), and for ``hessian_structure="lowrank"`` :meth:`~NatgradInterface.eig_lowrank`
(top eigenpairs over the whole loader). Here they come from natgrad's operators:

* ``full``: the Fisher's dense Gram matrix from per-sample rows (:meth:`GGNOperator.gram`);
* ``diag``: the exact diagonal (:meth:`GGNOperator.diagonal`);
* ``kron``: natgrad's K-FAC factors (:meth:`KFACOperator.from_data`, any factor strategy) for every
  layer type natgrad preconditions — Linear and Conv2d (``[G, A]`` for the weight, ``G · A_bb``
  for the bias: laplace-torch keeps one block per parameter, so the weight–bias cross terms are
  dropped, as by its other backends), Embedding (``[A, G]``, ``A`` diagonal) and normalization
  layers (their exact per-channel moments, one diagonal block per parameter). Per batch of ``M``
  the factors are returned as ``[M · G, (M/N) · A]`` (single blocks: ``M`` times the batch
  mean), so that laplace-torch's factor-wise sum over batches gives ``N · Ḡ ⊗ Ā``, the K-FAC of
  the summed loss;
* ``eig_lowrank``: the top ``low_rank`` eigenpairs of the K-FAC operator of the whole loader in
  closed form from ``projected`` factors (:func:`natgrad.fisher.kron.kfac_top_eigenpairs`; Lanczos
  on the operator when no closed form exists), times ``N``: a low-rank Laplace for networks whose
  dense Kronecker factors are too large to decompose.

Classes: :class:`NatgradGGN` (the exact Fisher = GGN, or with ``stochastic=True`` the MC Fisher)
and :class:`NatgradEF` (the empirical Fisher). Options go through ``backend_kwargs``:
``strategy`` / ``factor_options`` (K-FAC factors), ``low_rank``, ``chunk_size``, ``mc_samples``,
``seed``.

Not supported (``ValueError``): last-layer and subnetwork Laplace (laplace-torch passes
``last_layer`` / ``subnetwork_indices``), half-precision models (natgrad keeps factors in float32
or float64), non-deterministic (training-mode) models. The regression likelihood is the
unit-variance Gaussian; for the empirical Fisher laplace-torch's convention of gradients of the
squared error (not of half of it) is kept, so that results agree with its other backends.

Install (laplace-torch requires torchvision, which natgrad does not need): ::

    pip install --no-deps laplace-torch
    pip install asdfghjkl==0.1a4 opt-einsum torchmetrics curvlinops-for-pytorch \\
        backpack-for-pytorch --no-deps
    pip install einops unfoldNd einconv linear_operator lightning-utilities jaxtyping \\
        wadler-lindig
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch
from torch import Tensor, nn

from .._optional import require
from ..blocks import KroneckerBlock
from ..blocks.scale_shift import ScaleShiftBlock
from ..fisher import KFACOperator, lanczos_topk
from ..fisher.influence import FISHERS
from ..fisher.kron import kfac_top_eigenpairs

_curvature = require("laplace.curvature", "natgrad.integrations.laplace")
_utils = require("laplace.utils", "natgrad.integrations.laplace")
Kron = _utils.Kron

__all__ = ["NatgradEF", "NatgradGGN", "NatgradInterface"]

#: eigenvalues at or below this are dropped from the low-rank structure
EPS = 1e-6


class NatgradInterface(_curvature.CurvatureInterface):
    """The shared part of :class:`NatgradGGN` and :class:`NatgradEF` (module docstring).

    Args:
        model, likelihood, dict_key_x, dict_key_y: as laplace-torch passes them.
        last_layer, subnetwork_indices: must be off (``ValueError`` otherwise).
        strategy: natgrad factor strategy of :meth:`kron`. The default, ``"cholesky"``, keeps the
            dense factors and decomposes nothing when they are built (laplace-torch
            eigendecomposes them itself); ``"projected"`` gives the compressed factors, whose
            dense form is handed over.
        factor_options: its options (e.g. ``{"rank": 32}`` for ``projected``).
        low_rank: eigenpairs kept by :meth:`eig_lowrank`.
        chunk_size: samples per forward pass of the operators.
    """

    fisher: str = "exact"

    def __init__(self, model: nn.Module, likelihood: Any, last_layer: bool = False,
                 subnetwork_indices: torch.LongTensor | None = None,
                 dict_key_x: str = "input_ids", dict_key_y: str = "labels",
                 strategy: str = "cholesky", factor_options: Any = None, low_rank: int = 10,
                 chunk_size: int = 256, mc_samples: int = 1, seed: int = 0) -> None:
        if last_layer or subnetwork_indices is not None:
            raise ValueError("natgrad's laplace backend covers all trainable parameters: "
                             "last_layer and subnetwork_indices are not supported")
        if isinstance(low_rank, bool) or not isinstance(low_rank, int) or low_rank < 1:
            raise ValueError(f"low_rank must be a positive integer, got {low_rank!r}")
        super().__init__(model, likelihood, last_layer, subnetwork_indices, dict_key_x,
                         dict_key_y)
        self.strategy, self.factor_options = strategy, factor_options
        self.low_rank, self.chunk_size = low_rank, chunk_size
        self.mc_samples, self.seed = mc_samples, seed

    # ------------------------------------------------------------------ natgrad's view
    @property
    def loss_name(self) -> str:
        """natgrad's likelihood: ``"cross_entropy"`` or ``"mse"`` (unit-variance Gaussian)."""
        return "mse" if self.likelihood == "regression" else "cross_entropy"

    @property
    def _ef_scale(self) -> float:
        """laplace-torch's empirical Fisher of regression uses the squared error's gradients."""
        return 2.0 if (self.fisher == "empirical" and self.likelihood == "regression") else 1.0

    def _data(self, x: Any, y: Tensor) -> tuple[Any, Tensor]:
        if isinstance(x, MutableMapping):  # laplace-torch's models take the dict as one argument
            x = (dict(x),)
        if self.likelihood == "regression" and y.ndim == 1:
            y = y[:, None]
        return x, y

    def _options(self, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
        """The MC Fisher's options; laplace-torch may pass ``mc_samples`` per call. K-FAC's
        ``kfac_approx`` is natgrad's ``"expand"`` (the "reduce" variant is not implemented)."""
        kwargs = kwargs or {}
        approx = kwargs.get("kfac_approx", "expand")
        if approx != "expand":
            raise ValueError(f"kfac_approx={approx!r}: natgrad's K-FAC is the 'expand' kind "
                             "(Eschenhagen et al. 2023) only")
        if self.fisher != "mc":
            return {}
        return {"mc_samples": int(kwargs.get("mc_samples", self.mc_samples)), "seed": self.seed}

    def _operator(self, x: Any, y: Tensor, kwargs: dict[str, Any] | None = None) -> Any:
        return FISHERS[self.fisher](self.model, self._data(x, y), self.loss_name,
                                    params=self.params, chunk_size=self.chunk_size,
                                    **self._options(kwargs))

    def _loss(self, x: Any, y: Tensor) -> Tensor:
        with torch.no_grad():
            f = self.model(x)
            return (self.factor * self.lossfunc(f, y)).detach()

    # ------------------------------------------------------------------ laplace-torch's API
    def full(self, x: Any, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """``(loss, H)``: ``H = Σ_n`` (the Fisher of sample ``n``), ``(P, P)``."""
        op = self._operator(x, y, kwargs)
        H = op.gram(max_dim=op.dim) * (op.num_samples * self._ef_scale)
        return self._loss(x, y), H

    def diag(self, x: Any, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """``(loss, diag H)``, ``(P,)``, exact."""
        op = self._operator(x, y, kwargs)
        return self._loss(x, y), op.diagonal() * (op.num_samples * self._ef_scale)

    def kron(self, x: Any, y: Tensor, N: int, **kwargs: Any) -> tuple[Tensor, Any]:
        """``(loss, Kron)`` from natgrad's K-FAC factors of the batch, scaled for a sum over
        ``N`` samples (module docstring)."""
        kfac = self._kfac(self._data(x, y), kwargs)
        M = kfac_samples(x, self.dict_key_x)
        return self._loss(x, y), kron_blocks(kfac, self.params, M * self._ef_scale, M / N)

    def eig_lowrank(self, data_loader: Any) -> tuple[Tensor, Tensor, Tensor]:
        """``(U (P, k), λ (k,), loss)``: the top ``low_rank`` eigenpairs of ``N`` times the K-FAC
        operator of the whole loader (eigenvalues above ``EPS``) and the summed loss. Pass
        ``strategy="projected"`` for the closed form from rank-``r`` factors."""
        kfac = self._kfac(_LoaderData(data_loader, self))
        N = len(data_loader.dataset)
        pairs = kfac_top_eigenpairs(kfac, self.low_rank)
        if pairs is None:
            top = lanczos_topk(kfac, self.low_rank)
            pairs = (top.values, top.vectors)
        values, vectors = pairs
        values = values.to(kfac.dtype) * (N * self._ef_scale)
        keep = values > EPS
        loss = sum(self._loss(*self._data(x.to(kfac.device), y.to(kfac.device)))
                   for x, y in data_loader)
        return vectors[:, keep], values[keep], loss

    def _kfac(self, data: Any, kwargs: dict[str, Any] | None = None) -> KFACOperator:
        return KFACOperator.from_data(self.model, data, self.loss_name, self.fisher,
                                      strategy=self.strategy,
                                      factor_options=self.factor_options,
                                      chunk_size=self.chunk_size, **self._options(kwargs))


class NatgradGGN(NatgradInterface, _curvature.GGNInterface):
    """The exact Fisher (= GGN for these likelihoods); ``stochastic=True``: the MC Fisher."""

    def __init__(self, model: nn.Module, likelihood: Any, last_layer: bool = False,
                 subnetwork_indices: torch.LongTensor | None = None,
                 dict_key_x: str = "input_ids", dict_key_y: str = "labels",
                 stochastic: bool = False, **options: Any) -> None:
        NatgradInterface.__init__(self, model, likelihood, last_layer, subnetwork_indices,
                                  dict_key_x, dict_key_y, **options)
        self.stochastic = stochastic
        self.fisher = "mc" if stochastic else "exact"


class NatgradEF(NatgradInterface, _curvature.EFInterface):
    """The empirical Fisher ``Σ_n g_n g_nᵀ`` of the data labels' gradients."""

    fisher = "empirical"


class _LoaderData:
    """A laplace-torch loader as natgrad data: ``(x, y)`` batches with regression targets
    shaped like the outputs."""

    def __init__(self, loader: Any, backend: NatgradInterface) -> None:
        self.loader, self.backend = loader, backend
        self.dataset = loader.dataset

    def __iter__(self):
        for x, y in self.loader:
            yield self.backend._data(x, y)

    def __len__(self) -> int:
        return len(self.loader)


def kfac_samples(x: Any, key: str) -> int:
    """The batch size of ``x`` (a tensor or a dict holding ``key``)."""
    return int((x[key] if isinstance(x, MutableMapping) else x).shape[0])


def kron_blocks(kfac: KFACOperator, params: list[nn.Parameter], g_scale: float,
                a_scale: float) -> Any:
    """A ``laplace.utils.Kron`` with one entry per parameter of ``params`` (in that order) from
    the blocks of ``kfac``: output-side factors times ``g_scale``, input-side times ``a_scale``
    (module docstring); ``ValueError`` naming any parameter no block covers."""
    entries: dict[int, list[Tensor]] = {}
    for name, block in kfac.blocks.items():
        helper = kfac.layers[name]
        if isinstance(block, KroneckerBlock):
            entries.update(_kronecker_entries(helper, block, g_scale, a_scale))
        elif isinstance(block, ScaleShiftBlock):
            M = block.factors[0].M * g_scale  # (C, 2, 2): per-sample moments, no input side
            for p, moment in zip(helper.params, (M[:, 0, 0], M[:, 1, 1])):
                entries[id(p)] = [torch.diag(moment)]
        else:
            raise ValueError(f"layer {name!r}: natgrad block {type(block).__name__} has no "
                             "Kronecker form for laplace-torch")
    missing = [i for i, p in enumerate(params) if id(p) not in entries]
    if missing:
        raise ValueError(f"parameters {missing} (in model.parameters() order) are in no layer "
                         "natgrad preconditions; use hessian_structure='diag' or 'full'")
    dtype = params[0].dtype
    return Kron([[f.to(dtype) for f in entries[id(p)]] for p in params])


def _kronecker_entries(helper: Any, block: KroneckerBlock, g_scale: float,
                       a_scale: float) -> dict[int, list[Tensor]]:
    """``A ⊗ G`` of ``[W | b]`` as laplace-torch blocks of the weight (in the order of its
    row-major flattening) and of the bias."""
    A = block.A.to_dense() * a_scale
    G = block.G.to_dense() * g_scale
    weight = helper.params[0]
    bias = helper.params[1] if len(helper.params) > 1 else None
    A_w = A[:-1, :-1] if bias is not None else A
    probe = torch.arange(weight.numel(), dtype=torch.float64).reshape(weight.shape)
    parts = [probe] + ([torch.zeros(bias.shape, dtype=torch.float64)] if bias is not None
                       else [])
    M = helper.matrix_blocks(parts)[0]  # the weight's (d_G, d_A') matrix
    if torch.equal(M.reshape(-1), probe.reshape(-1)):  # W flattens G-major: kron(G, A)
        out = {id(weight): [G, A_w]}
    elif torch.equal(M.T.reshape(-1), probe.reshape(-1)):  # A-major (embeddings): kron(A, G)
        out = {id(weight): [A_w, G]}
    else:
        raise ValueError(f"cannot lay out the Kronecker block of {type(helper.module).__name__}"
                         " for laplace-torch")
    if bias is not None:
        out[id(bias)] = [G * float(block.A.to_dense()[-1, -1])]  # only the weight's A is rescaled
    return out
