"""Matrix-free Fisher operators of the form ``F = (1/N) Σ_n J_nᵀ B_nᵀ B_n J_n``.

``J_n = ∂f(x_n)/∂θ`` is the output Jacobian (``C × P``) and ``B_n`` an ``R × C`` output-space
factor; the three Fishers of DESIGN §2 differ only in ``B_n``:

==============  =====================================================  ==========================
operator        ``B_nᵀ B_n``                                           ``R``
==============  =====================================================  ==========================
ExactFisher     Hessian of ``−log p(y|f)``: ``diag(p) − ppᵀ`` (CE),     ``C``
                ``I`` (unit-variance Gaussian, ``½‖y−f‖²``), Bernoulli
MCFisher        ``(1/S) Σ_s r_s r_sᵀ``, ``r_s = ∇_f −log p(ŷ_s|f)``,    ``S`` (``mc_samples``)
                ``ŷ_s ~ p(y|f)`` drawn once from a seeded generator
EmpiricalFisher ``r rᵀ`` with the data label ``y``: *not a Fisher* in   ``1``
                general (it is the uncentred gradient covariance)
==============  =====================================================  ==========================

Convention: the **mean** over the ``N`` samples. ``F v`` costs one ``jvp`` and one ``vjp`` per
chunk (memory ``O(P + chunk)``); ``g_nᵀ v = r_nᵀ (J_n v)`` is the gradient-outer-product trick, so
MC / empirical products never form per-sample gradients. The exact diagonal needs the rows of
``B_n J_n``: for Linear / Conv2d layers that own their gradient, ``B_n`` pulled back to the layer
outputs (``R`` backward passes per chunk, :mod:`natgrad.fisher.pullback`) times the layer inputs
(:mod:`natgrad.fisher.layer_diagonal`); for any other parameter — tied or reused ones included,
every use summed before squaring — ``R`` backward passes per sample, vectorised with ``vmap``
(never one per parameter).

**Models without forward-mode AD** (``F.scaled_dot_product_attention``'s fused CPU kernel, a
custom autograd function without ``jvp``): the first product tries one ``jvp`` on one sample;
when it fails, :attr:`GGNOperator.jacobian_mode` becomes ``"reverse"`` and every product uses
the chunks' rows ``U`` of ``B_n J_n`` (``R`` backward passes per sample): ``F V = (1/N) Σ Uᵀ (U
V)``, the same matrix, ``m · R · P`` numbers per chunk.

**Batches and outputs.** ``data`` is read as by the optimizer's data capture
(:mod:`natgrad.curvature.data`): an input ``x`` may be a tensor (the model is called as
``model(x)``), a tuple or list (``model(*x)``) or a dict (``model(**x)``) of batch-first tensors;
floating tensors are cast to the operator's dtype, integer and bool ones (token ids, masks) keep
theirs, and chunks slice every tensor alike along dim 0. When the forward returns a structure,
``output_key`` says where the logits are (as for :class:`natgrad.KFAC`: default the ``"logits"``
entry or attribute; a key, attribute name or tuple index otherwise). The output may have any
shape ``(m, ..., C)``; it is flattened per sample to ``(m, C_f)`` for the products.

For ``cross_entropy`` with more than one dim per sample (sequence logits ``(B, T, V)``) the last
dim is the class and every other one a position, with the optimizer's convention (docs/DESIGN.md,
"Sequence outputs and structured batches in the operators"): a sample's negative log-likelihood
is the **sum over its positions** and the operators average over samples (sequences),
``F = (1/N) Σ_n Σ_t J_ntᵀ H_nt J_nt``. The output factor comes from
:func:`natgrad.curvature.rows.output_directions`, the directions the optimizer's captures pull
back: the exact ``B_n`` is block diagonal (``R = T · V`` rows, each on one position), the
Monte-Carlo one draws one label per position (``R = mc_samples``), the empirical ``r_n`` is the
gradient of the sequence's summed NLL (``R = 1``). Products apply the exact factor per position;
the pull-back paths (:meth:`GGNOperator.diagonal`, layer traces,
:class:`~natgrad.fisher.rows.RowFisher`) hold its ``T · V`` rows, ``m · (T·V)²`` numbers per
chunk: lower ``chunk_size``, or use :class:`MCFisher`, for large vocabularies. Targets ``y`` of
shape ``(B, T)`` hold the class ids per position; every position counts for the exact and
Monte-Carlo Fishers (no padding mask; the empirical one gets a zero gradient at an ignored target,
``-100``). ``mse`` and ``bce`` are elementwise: any output shape already reads as
positions.

**Padding embeddings.** The model runs with the padding row of every ``nn.Embedding`` with a
``padding_idx`` held constant (:func:`natgrad.fisher._model.constant_padding_rows`): autograd's
backward gives that row no gradient, and forward mode now agrees, so the Fisher's padding row
and column are zero (a head tied to the embedding keeps its own use of the row).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, functionalize, jvp, linearize, vjp, vmap

from ..curvature.data import batch_size, map_tensors, model_args, slice_batch, to_model
from ..curvature.outputs import check_output_key, find_output
from ..curvature.rows import output_directions
from ..likelihoods import Likelihood, get_likelihood
from ._model import (
    Data,
    check_deterministic,
    constant_padding_rows,
    count_samples,
    iter_chunks,
    padding_embeddings,
    select_params,
)
from .base import LinearOperator
from .layer_diagonal import ggn_diagonal
from .pullback import ChunkPullback, layer_pullbacks

#: per-sample rows formed per vmapped backward in the reverse-mode path (64 MB of float32)
ROW_BLOCK_ELEMENTS = 1 << 24


class _Chunk(NamedTuple):
    """One chunk's forward pass, ready for products: ``J v`` by ``jvp_fn``, ``Jᵀ u`` by
    ``vjp_fn``; ``B`` the output factor as :meth:`GGNOperator.product_factor` gives it. In the
    reverse-mode path (:attr:`GGNOperator.jacobian_mode`) only ``U``, the chunk's rows of
    ``B_n J_n`` ``(m · R, P)``."""

    x: Any
    B: Tensor | None
    vjp_fn: Callable[[Tensor], tuple[dict[str, Tensor]]] | None
    jvp_fn: Callable[[dict[str, Tensor]], Tensor] | None
    nbytes: int
    U: Tensor | None = None


def _apply_factor(B: Tensor, JV: Tensor) -> Tensor:
    """``Bᵀ B`` applied to columns ``JV (k, m, C)`` per sample: ``B (m, R, C)``, or per-position
    blocks ``(m, T, R, V)`` of a block-diagonal factor (``C = T · V``)."""
    if B.ndim == 3:
        BJV = torch.einsum("mrd,kmd->kmr", B, JV)
        return torch.einsum("mrc,kmr->kmc", B, BJV)
    k, m = JV.shape[:2]
    J4 = JV.reshape(k, m, B.shape[1], B.shape[3])
    BJV = torch.einsum("mtrv,kmtv->kmtr", B, J4)
    return torch.einsum("mtrv,kmtr->kmtv", B, BJV).reshape(k, m, -1)


class GGNOperator(LinearOperator):
    """Base of the three Fisher operators; subclasses define :meth:`output_factor` and their
    :attr:`fisher` kind (one of :data:`natgrad.curvature.FISHER_TYPES`).

    Args:
        model: the network; its train/eval mode is used as is (refused if non-deterministic).
            Called as ``model(x)``, ``model(*x)`` or ``model(**x)`` for a tensor, tuple or dict
            input ``x`` (see the module docstring).
        data: ``(X, y)`` / ``(X,)``, a ``TensorDataset`` or a ``DataLoader`` of ``(x, y)``
            batches; ``X`` / ``x`` a tensor, a tuple or a dict of batch-first tensors, ``y``
            ``(m,)`` class ids, ``(m, T)`` for sequence logits ``(m, T, C)``, or float targets
            shaped like the output.
        loss: likelihood kind, ``"cross_entropy"``, ``"mse"`` or ``"bce"``.
        params: parameters (tensors or names) the operator acts on; default all trainable ones.
            The others are held fixed.
        chunk_size: samples per forward pass.
        max_columns: columns of a ``(P, k)`` product vmapped together (memory ∝ this × chunk);
            1 (a loop) is fastest on CPU for conv nets.
        cache: keep each chunk's forward pass between products: the ``vjp`` closure and the
            linearised forward (``torch.func.linearize`` of the functionalized model, so in-place
            ops cannot alter the cached activations: ``J v`` without recomputing the primal
            pass), ~2.5× faster products for memory ``O(N · activations)``.
        cache_bytes: budget for the cache (estimated from the size of the modules' outputs);
            chunks beyond it are recomputed in every product. ``None``: no limit.
        output_key: where the logits are when the forward returns a structure (``None``: a
            tensor as it is, else the ``"logits"`` entry / attribute; a key or attribute name
            (str), a tuple index (int)); ``ValueError`` at construction when they are not found.

    Attributes:
        output_shape: the per-sample shape of the model's output (from the first sample), e.g.
            ``(C,)`` or ``(T, V)``.
    """

    fisher: str

    def __init__(
        self,
        model: nn.Module,
        data: Data,
        loss: str = "cross_entropy",
        params: Sequence[Tensor] | Sequence[str] | None = None,
        chunk_size: int = 256,
        max_columns: int = 1,
        cache: bool = False,
        cache_bytes: int | None = None,
        output_key: str | int | None = None,
    ) -> None:
        check_deterministic(model)
        if chunk_size < 1 or max_columns < 1:
            raise ValueError(f"chunk_size and max_columns must be positive, got {chunk_size}, "
                             f"{max_columns}")
        selected = select_params(model, params)
        first = selected[0][1]
        super().__init__([n for n, _ in selected], [p.shape for _, p in selected], first.dtype,
                         first.device)
        self.model = model
        self.data = data
        self.loss = loss
        self.likelihood: Likelihood = get_likelihood(loss)
        self.chunk_size = chunk_size
        self.max_columns = max_columns
        self.num_samples = count_samples(data)
        if self.num_samples == 0:
            raise ValueError("the data set is empty")
        self._params = {n: p.detach() for n, p in selected}
        chosen = set(self._params)
        self._fixed = {n: p.detach() for n, p in model.named_parameters() if n not in chosen}
        self._fixed.update(dict(model.named_buffers()))
        self._padding = padding_embeddings(model)
        self.output_key = check_output_key(output_key)
        x0, _ = next(iter_chunks(data, 1))
        with torch.no_grad():
            self.output_shape = tuple(self._output(self._params, to_model(
                x0, self.device, self.dtype)).shape[1:])
        # the class dim of categorical outputs with positions (None: the flat path)
        self._event = (self.output_shape[-1] if self.likelihood.categorical
                       and len(self.output_shape) > 1 else None)
        self.cache = cache
        self.cache_bytes = cache_bytes
        self._cache: list[_Chunk] = []
        self._cache_state = "open"  # "all" once every chunk is cached, "full" at the budget
        self._linearize_ok = True
        #: how ``J v`` is computed: ``"forward"`` (forward-mode AD, ``jvp``), or ``"reverse"``
        #: when the model has an op without forward-mode AD (e.g. the fused CPU kernel of
        #: ``F.scaled_dot_product_attention``): each chunk's rows of ``B_n J_n`` from ``R``
        #: backward passes per sample, ``F V = (1/N) Σ Uᵀ (U V)``. ``None`` until the first
        #: product decides (one ``jvp`` tried on one sample).
        self.jacobian_mode: str | None = None
        #: why the reverse-mode path was chosen (the forward-mode error), else ``None``
        self.jacobian_mode_reason: str | None = None

    # ------------------------------------------------------------------ the model as a function
    def _output(self, params: dict[str, Tensor], x: Any) -> Tensor:
        """The logits ``(m, ...)`` as the model returns them (found by ``output_key``)."""
        args, kwargs = model_args(x)
        with constant_padding_rows(self._padding):  # forward mode as reverse mode reads them
            out = functional_call(self.model, {**self._fixed, **params}, args, kwargs)
        return find_output(out, self.output_key)

    def _f(self, params: dict[str, Tensor], x: Any) -> Tensor:
        """Outputs ``(m, C)`` (flattened per sample)."""
        return self._output(params, x).flatten(1)

    def forward(self, x: Any) -> Tensor:
        """Outputs ``(m, C)`` (flattened per sample) at the operator's parameters (which carry
        no gradient); ``x`` as :meth:`chunks` gives it."""
        return self._f(self._params, x)

    def chunks(self, chunk_size: int | None = None) -> Iterator[tuple[Any, Tensor | None]]:
        """``(x, y)`` chunks of the data (``x`` on the operator's device, its floating tensors
        in the operator's dtype: :func:`natgrad.curvature.data.to_model`)."""
        for x, y in iter_chunks(self.data, chunk_size or self.chunk_size):
            yield to_model(x, self.device, self.dtype), y

    def pullbacks(self, modules: dict[str, nn.Module]) -> Iterator[ChunkPullback]:
        """Per chunk, the rows of ``B_n`` pulled back to the outputs of ``modules`` (each must
        run once per forward pass): :func:`natgrad.fisher.pullback.layer_pullbacks`."""
        return layer_pullbacks(self.forward, modules, self.chunks(), self.output_factor)

    def output_factor(self, out: Tensor, y: Tensor | None, chunk: int) -> Tensor:
        """``B_n`` for a chunk: ``(m, R, C)`` from outputs ``(m, C)`` flattened per sample;
        ``chunk`` is its index. Categorical outputs with positions (``(m, T, V)`` before
        flattening) get the capture's per-position directions (see the module docstring); the
        others :meth:`flat_factor`."""
        if self._event is None:
            return self.flat_factor(out, y, chunk)
        f = out.reshape(out.shape[0], -1, self._event)  # (m, T, V): every other dim a position
        if y is not None and not y.is_floating_point() and y.numel() == f.shape[0] * f.shape[1]:
            y = y.reshape(f.shape[:2])  # (m, T1, T2) ids as (m, T); other shapes are refused
        gen = self._generator(chunk, out.device)
        dirs = output_directions(self.likelihood, self.fisher, f, y, gen,
                                 samples=getattr(self, "mc_samples", 1))
        return dirs.flatten(2).transpose(0, 1).contiguous()  # (R, m, T·V) -> (m, R, T·V)

    def product_factor(self, out: Tensor, y: Tensor | None, chunk: int) -> Tensor:
        """``B_n`` in the form the products use: :meth:`output_factor`, or (the exact Fisher of
        positions) the per-position blocks ``(m, T, R, V)`` of its block-diagonal factor, which
        the products apply without forming the ``(m, T·V, T·V)`` matrix."""
        return self.output_factor(out, y, chunk)

    def flat_factor(self, out: Tensor, y: Tensor | None, chunk: int) -> Tensor:
        """:meth:`output_factor` for outputs with one event per sample (``(m, C)``, or an
        elementwise likelihood)."""
        raise NotImplementedError

    def _generator(self, chunk: int, device: torch.device) -> torch.Generator | None:
        """The generator of the labels drawn for chunk ``chunk`` (none: nothing is drawn)."""
        return None

    @property
    def rank_bound(self) -> int:
        """An upper bound on ``rank F``: ``N · R``."""
        raise NotImplementedError

    def _activation_bytes(self, x: Any) -> int:
        """Bytes of all leaf-module outputs of one forward pass on ``x`` (a cache estimate)."""
        total = 0

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            nonlocal total
            if isinstance(output, Tensor):
                total += output.numel() * output.element_size()

        leaves = [m for m in self.model.modules() if next(m.children(), None) is None]
        handles = [m.register_forward_hook(hook) for m in leaves]
        try:
            with torch.no_grad():
                self._f(self._params, x)
        finally:
            for h in handles:
                h.remove()
        return total

    def choose_jacobian_mode(self, x: Any = None) -> str:
        """:attr:`jacobian_mode`, decided once by one ``jvp`` on the first sample of ``x``
        (default: of the data)."""
        if self.jacobian_mode is None:
            if x is None:
                x, _ = next(self.chunks(chunk_size=1))
            one = slice_batch(x, slice(0, 1))
            try:
                jvp(lambda p: self._f(p, one), (self._params,), (self._params,))
                self.jacobian_mode = "forward"
            except (NotImplementedError, RuntimeError) as err:
                self.jacobian_mode = "reverse"
                self.jacobian_mode_reason = str(err).splitlines()[0] if str(err) else repr(err)
        return self.jacobian_mode

    def _make_chunk(self, x: Any, y: Tensor | None, i: int, linear: bool,
                    estimate: bool) -> _Chunk:
        x = to_model(x, self.device, self.dtype)
        if self.choose_jacobian_mode(x) == "reverse":
            with torch.no_grad():
                B = self.output_factor(self._f(self._params, x), y, i)
            U = torch.cat(list(self._chunk_rows(x, B, ROW_BLOCK_ELEMENTS)))
            return _Chunk(x, None, None, None, U.numel() * U.element_size() if estimate else 0,
                          U)
        out, vjp_fn = vjp(lambda p: self._f(p, x), self._params)
        B = self.product_factor(out.detach(), y, i)
        jvp_fn = None
        if linear and self._linearize_ok:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # fx const-folding chatter
                    # functionalized: the traced graph holds the primal activations as
                    # constants, and an in-place op on one (ReLU(inplace=True), x += y) would
                    # mutate it on every call, so each reuse would drift
                    _, jvp_fn = linearize(functionalize(lambda p: self._f(p, x)), self._params)
            except Exception:  # a model make_fx cannot trace: plain jvp below
                self._linearize_ok = False
        if jvp_fn is None:
            def jvp_fn(t: dict[str, Tensor], x: Any = x) -> Tensor:
                return jvp(lambda p: self._f(p, x), (self._params,), (t,))[1]
        # measured: the vjp closure keeps ~0.75×, the linearised graph ~2× the modules' outputs
        nbytes = 3 * self._activation_bytes(x) if estimate else 0
        return _Chunk(x, B, vjp_fn, jvp_fn, nbytes)

    def _chunks(self, columns: int = 1) -> Iterator[_Chunk]:
        """The chunks' forward passes; from the cache when enabled (within ``cache_bytes``)."""
        yield from self._cache
        if self._cache_state == "all":
            return
        done = len(self._cache)
        budget = math.inf if self.cache_bytes is None else self.cache_bytes
        used = sum(c.nbytes for c in self._cache)
        for i, (x, y) in enumerate(iter_chunks(self.data, self.chunk_size)):
            if i < done:
                continue
            caching = self.cache and self._cache_state == "open"
            # linearising costs ~2 jvps: worth it when the chunk is reused
            item = self._make_chunk(x, y, i, linear=caching or columns >= 3,
                                    estimate=caching and self.cache_bytes is not None)
            if caching:
                if used + item.nbytes <= budget:
                    self._cache.append(item)
                    used += item.nbytes
                else:  # over budget: this and later chunks are recomputed in every product
                    self._cache_state = "full"
            yield item
        if self.cache and self._cache_state == "open":
            self._cache_state = "all"

    def clear_cache(self) -> None:
        """Drop the cached forward passes (they are rebuilt on the next product)."""
        self._cache = []
        self._cache_state = "open"

    # ------------------------------------------------------------------ products
    def _matmat(self, V: Tensor) -> Tensor:
        result = torch.zeros_like(V)
        k = V.shape[1]
        for ch in self._chunks(k):
            if ch.U is not None:  # reverse-mode path: the chunk's rows
                result += ch.U.T @ (ch.U @ V)
                continue
            for s in range(0, k, self.max_columns):
                cols = V[:, s:s + self.max_columns]
                if cols.shape[1] == 1:  # no vmap: faster for one column
                    JV = ch.jvp_fn(dict(zip(self.names, self.unflatten(cols[:, 0]))))[None]
                else:
                    JV = vmap(ch.jvp_fn)(dict(zip(self.names, self.unflatten(cols))))
                HJV = _apply_factor(ch.B, JV)
                if cols.shape[1] == 1:
                    g = ch.vjp_fn(HJV[0])[0]
                    result[:, s] += torch.cat([g[n].reshape(-1) for n in self.names])
                else:
                    grads = vmap(ch.vjp_fn)(HJV)[0]
                    result[:, s:s + cols.shape[1]] += torch.cat(
                        [grads[n].reshape(cols.shape[1], -1) for n in self.names], dim=1).T
        return result / self.num_samples

    # ------------------------------------------------------------------ per-sample rows
    def sample_rows(self, memory_elements: int) -> Iterator[Tensor]:
        """Rows of ``B_n J_n`` for sub-chunks of samples: ``(s · R, P)`` each.

        ``R`` backward passes per sample (vmapped over samples and rows, one forward per
        sub-chunk); ``s`` is chosen so that ``s · R · P ≤ memory_elements``.
        """

        for i, (x, y) in enumerate(iter_chunks(self.data, self.chunk_size)):
            x = to_model(x, self.device, self.dtype)
            with torch.no_grad():
                B = self.output_factor(self._f(self._params, x), y, i)
            yield from self._chunk_rows(x, B, memory_elements)

    def _chunk_rows(self, x: Any, B: Tensor, memory_elements: int) -> Iterator[Tensor]:
        """Rows of ``B_n J_n`` of one chunk ``x`` with output factor ``B (m, R, C)``, in order
        (sample by sample, ``R`` rows each): ``(s · R, P)`` per sub-chunk of ``s`` samples
        (``s · R · P ≤ memory_elements``), or, when one sample's ``R · P`` exceeds it (the exact
        Fisher of a sequence: ``R = T · V``), ``(r, P)`` blocks of one sample's rows
        (``r · P ≤ memory_elements``), so that the vmapped backward passes never hold more.
        Reverse mode only (one ``vjp`` per sample, vmapped over the samples and the rows). A
        tied parameter's columns sum its uses (``functional_call`` ties the weights)."""

        def rows(x1: Any, B1: Tensor) -> dict[str, Tensor]:
            one = map_tensors(x1, lambda t: t[None])  # the sample as a batch of one
            _, fn = vjp(lambda p: self._f(p, one)[0], self._params)
            return vmap(fn)(B1)[0]  # each (R, *shape)

        R = B.shape[1]
        sub = max(1, memory_elements // max(1, R * self.dim))
        block = R if R * self.dim <= memory_elements else max(1, memory_elements // self.dim)
        for s in range(0, batch_size(x), sub):
            for r in range(0, R, block):
                with warnings.catch_warnings():  # vmap's "no batching rule: a loop" (exact)
                    warnings.filterwarnings("ignore", message=".*performance drop.*")
                    g = vmap(rows)(slice_batch(x, slice(s, s + sub)), B[s:s + sub, r:r + block])
                n = g[self.names[0]].shape[0] * g[self.names[0]].shape[1]
                yield torch.cat([g[k].reshape(n, -1) for k in self.names], dim=1)

    def row_bytes_per_sample(self) -> int:
        """Bytes of one sample's rows of ``B_n J_n`` (``R · P`` floats): what the reverse-mode
        products hold per sample of a chunk (:attr:`jacobian_mode`)."""
        x, y = next(self.chunks(1))
        with torch.no_grad():
            R = self.output_factor(self._f(self._params, x), y, 0).shape[1]
        return R * self.dim * torch.empty((), dtype=self.dtype).element_size()

    def diagonal(self, memory_elements: int = 1 << 25) -> Tensor:
        """The exact diagonal ``(1/N) Σ_n Σ_r ((B_n J_n)_{r,:})²``, shape ``(P,)``.

        Linear / Conv2d layers: ``B_n`` pulled back to their outputs (one forward, ``R``
        backward passes per chunk) and combined with their inputs
        (:func:`~natgrad.fisher.layer_diagonal.ggn_diagonal`); other parameters:
        :meth:`sample_diagonal`.
        """
        return ggn_diagonal(self, memory_elements)

    def sample_diagonal(self, memory_elements: int = 1 << 25) -> Tensor:
        """:meth:`diagonal` from per-sample gradients of all parameters (any model).

        ``R`` backward passes per sample (vmapped over samples and rows); per-sample gradients of a
        sub-chunk sized so that ``sub · R · P ≤ memory_elements``.
        """
        diag = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for U in self.sample_rows(memory_elements):
            diag += U.pow(2).sum(0)
        return diag / self.num_samples

    def gram(self, memory_elements: int = 1 << 25, max_dim: int = 8192) -> Tensor:
        """The dense ``(P, P)`` matrix ``(1/N) Σ_n (B_n J_n)ᵀ (B_n J_n)`` from the per-sample rows
        (``R`` backward passes per sample instead of ``P`` products): small blocks only."""
        if self.dim > max_dim:
            raise ValueError(f"refusing to form a dense {self.dim}×{self.dim} matrix "
                             f"(max_dim={max_dim})")
        M = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)
        for U in self.sample_rows(memory_elements):
            M += U.T.double() @ U.double()
        return (M / self.num_samples).to(self.dtype)

    def block(self, name: str) -> GGNOperator:
        """The layer's diagonal block, differentiating only its parameters (cheaper products)."""
        return self.restrict([self.names[i] for i in self.block_indices(name)])

    def restrict(self, names: Sequence[str]) -> GGNOperator:
        """The diagonal block of the named parameters (the others held fixed), own cache."""
        unknown = [n for n in names if n not in self._params]
        if unknown or not names:
            raise ValueError(f"unknown or no parameter names {unknown}; known: {self.names}")
        names = [n for n in self.names if n in set(names)]
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        LinearOperator.__init__(clone, names, [self._params[n].shape for n in names], self.dtype,
                                self.device)
        clone._params = {n: self._params[n] for n in names}
        clone._fixed = {**self._fixed, **{n: p for n, p in self._params.items() if n not in names}}
        clone.clear_cache()
        return clone


class ExactFisher(GGNOperator):
    """The exact (type-2) Fisher / GGN ``(1/N) Σ_n J_nᵀ H_n J_n`` (see the module docstring)."""

    fisher = "exact"

    def flat_factor(self, out: Tensor, y: Tensor | None, chunk: int) -> Tensor:
        return self.likelihood.hessian_sqrt(out)

    def product_factor(self, out: Tensor, y: Tensor | None, chunk: int) -> Tensor:
        if self._event is None:
            return self.output_factor(out, y, chunk)
        return self.likelihood.event_hessian_sqrt(out.reshape(out.shape[0], -1, self._event))

    @property
    def rank_bound(self) -> int:
        """``N · C_f``: the output entries of all samples (for sequences of several lengths the
        sum over chunks, one forward pass each)."""
        if self._event is None:
            return self.num_samples * self._out_dim()
        total = 0
        with torch.no_grad():
            for x, _ in self.chunks():
                total += int(self.forward(x).numel())
        return total

    def _out_dim(self) -> int:
        x, _ = next(iter_chunks(self.data, 1))
        with torch.no_grad():
            return int(self._f(self._params, to_model(x, self.device, self.dtype)).shape[1])


class MCFisher(GGNOperator):
    """Monte-Carlo Fisher: ``mc_samples`` labels per datum from ``p(y|f)``, drawn once (seeded).

    An unbiased estimate of the true Fisher; converges to :class:`ExactFisher` as
    ``mc_samples → ∞``. Labels of chunk ``i`` come from a generator seeded with ``seed + i``, so
    the operator is one fixed matrix across products.
    """

    fisher = "mc"

    def __init__(self, model: nn.Module, data: Data, loss: str = "cross_entropy",
                 mc_samples: int = 1, seed: int = 0, **kwargs) -> None:
        if mc_samples < 1:
            raise ValueError(f"mc_samples must be positive, got {mc_samples}")
        self.mc_samples = mc_samples
        self.seed = seed
        super().__init__(model, data, loss, **kwargs)

    def _generator(self, chunk: int, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed + chunk)

    def flat_factor(self, out: Tensor, y: Tensor | None, chunk: int) -> Tensor:
        gen = self._generator(chunk, out.device)
        rows = [self.likelihood.nll_grad(out, self.likelihood.sample(out, gen))
                for _ in range(self.mc_samples)]
        return torch.stack(rows, dim=1) / self.mc_samples ** 0.5

    @property
    def rank_bound(self) -> int:
        return self.num_samples * self.mc_samples


class EmpiricalFisher(GGNOperator):
    """Empirical "Fisher" ``(1/N) Σ_n g_n g_nᵀ`` with the data labels' gradients ``g_n``.

    Not a Fisher in general (it ignores the model's predictive distribution); offered because many
    optimizers use it. Needs labels (``y`` in the data).
    """

    fisher = "empirical"

    def output_factor(self, out: Tensor, y: Tensor | None, chunk: int) -> Tensor:
        if y is None:
            raise ValueError("the empirical Fisher needs labels: pass data as (X, y)")
        return super().output_factor(out, y.to(out.device), chunk)

    def flat_factor(self, out: Tensor, y: Tensor | None, chunk: int) -> Tensor:
        return self.likelihood.nll_grad(out, y.to(out.device))[:, None, :]

    @property
    def rank_bound(self) -> int:
        return self.num_samples
