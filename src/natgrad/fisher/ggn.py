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
``B_n J_n``: ``R`` backward passes per sample, vectorised with ``vmap`` (never one per parameter).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp, vmap

from ..likelihoods import Likelihood, get_likelihood
from ._model import Data, check_deterministic, count_samples, iter_chunks, select_params
from .base import LinearOperator


class GGNOperator(LinearOperator):
    """Base of the three Fisher operators; subclasses define :meth:`output_factor`.

    Args:
        model: the network; its train/eval mode is used as is (refused if non-deterministic).
        data: ``(X, y)`` tensors, a ``TensorDataset`` or a ``DataLoader`` of ``(x, y)`` batches.
        loss: likelihood kind, ``"cross_entropy"``, ``"mse"`` or ``"bce"``.
        params: parameters (tensors or names) the operator acts on; default all trainable ones.
            The others are held fixed.
        chunk_size: samples per forward pass.
        max_columns: columns of a ``(P, k)`` product vmapped together (memory ∝ this × chunk);
            1 (a loop) is fastest on CPU for conv nets.
        cache: keep each chunk's forward pass (``vjp`` closure and ``B_n``) between products:
            memory ``O(N · activations)``, ~30 % faster products.
    """

    def __init__(
        self,
        model: nn.Module,
        data: Data,
        loss: str = "cross_entropy",
        params: Sequence[Tensor] | Sequence[str] | None = None,
        chunk_size: int = 256,
        max_columns: int = 1,
        cache: bool = False,
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
        self.cache = cache
        self._cache: list[tuple] | None = None

    # ------------------------------------------------------------------ the model as a function
    def _f(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """Outputs ``(m, C)`` (flattened per sample)."""
        return functional_call(self.model, {**self._fixed, **params}, (x,)).flatten(1)

    def output_factor(self, out: Tensor, y: Tensor | None, chunk: int) -> Tensor:
        """``B_n`` for a chunk: ``(m, R, C)`` from outputs ``(m, C)``; ``chunk`` is its index."""
        raise NotImplementedError

    @property
    def rank_bound(self) -> int:
        """An upper bound on ``rank F``: ``N · R``."""
        raise NotImplementedError

    def _chunks(self):
        """Per chunk ``(x, B, vjp_fn)``, from the cache when enabled."""
        if self._cache is not None:
            yield from self._cache
            return
        store = [] if self.cache else None
        for i, (x, y) in enumerate(iter_chunks(self.data, self.chunk_size)):
            x = x.to(device=self.device, dtype=self.dtype)
            out, vjp_fn = vjp(lambda p, x=x: self._f(p, x), self._params)
            B = self.output_factor(out.detach(), y, i)
            item = (x, B, vjp_fn)
            if store is not None:
                store.append(item)
            yield item
        if store is not None:
            self._cache = store

    # ------------------------------------------------------------------ products
    def _matmat(self, V: Tensor) -> Tensor:
        result = torch.zeros_like(V)
        for x, B, vjp_fn in self._chunks():
            for s in range(0, V.shape[1], self.max_columns):
                cols = V[:, s:s + self.max_columns]
                tangents = dict(zip(self.names, self.unflatten(cols)))

                def jv(t: dict[str, Tensor], x: Tensor = x) -> Tensor:
                    return jvp(lambda p: self._f(p, x), (self._params,), (t,))[1]

                JV = vmap(jv)(tangents)  # (k, m, C)
                HJV = torch.einsum("mrc,mrd,kmd->kmc", B, B, JV)
                grads = vmap(vjp_fn)(HJV)[0]
                result[:, s:s + cols.shape[1]] += torch.cat(
                    [grads[n].reshape(cols.shape[1], -1) for n in self.names], dim=1).T
        return result / self.num_samples

    # ------------------------------------------------------------------ exact diagonal
    def diagonal(self, memory_elements: int = 1 << 25) -> Tensor:
        """The exact diagonal ``(1/N) Σ_n Σ_r ((B_n J_n)_{r,:})²``, shape ``(P,)``.

        ``R`` backward passes per sample (vmapped over samples and rows); per-sample gradients of a
        sub-chunk sized so that ``sub · R · P ≤ memory_elements``.
        """
        diag = torch.zeros(self.dim, dtype=self.dtype, device=self.device)

        def rows(x1: Tensor, B1: Tensor) -> dict[str, Tensor]:
            _, fn = vjp(lambda p: self._f(p, x1[None])[0], self._params)
            return vmap(fn)(B1)[0]  # each (R, *shape)

        for i, (x, y) in enumerate(iter_chunks(self.data, self.chunk_size)):
            x = x.to(device=self.device, dtype=self.dtype)
            with torch.no_grad():
                B = self.output_factor(self._f(self._params, x), y, i)
            sub = max(1, memory_elements // max(1, B.shape[1] * self.dim))
            for s in range(0, x.shape[0], sub):
                g = vmap(rows)(x[s:s + sub], B[s:s + sub])
                diag += torch.cat([g[n].pow(2).sum((0, 1)).reshape(-1) for n in self.names])
        return diag / self.num_samples

    def block(self, name: str) -> GGNOperator:
        """The layer's diagonal block, differentiating only its parameters (cheaper products)."""
        names = [self.names[i] for i in self.block_indices(name)]
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        LinearOperator.__init__(clone, names, [self._params[n].shape for n in names], self.dtype,
                                self.device)
        clone._params = {n: self._params[n] for n in names}
        clone._fixed = {**self._fixed, **{n: p for n, p in self._params.items() if n not in names}}
        clone._cache = None
        return clone


class ExactFisher(GGNOperator):
    """The exact (type-2) Fisher / GGN ``(1/N) Σ_n J_nᵀ H_n J_n`` (see the module docstring)."""

    def output_factor(self, out: Tensor, y: Tensor | None, chunk: int) -> Tensor:
        return self.likelihood.hessian_sqrt(out)

    @property
    def rank_bound(self) -> int:
        return self.num_samples * self._out_dim()

    def _out_dim(self) -> int:
        x, _ = next(iter_chunks(self.data, 1))
        with torch.no_grad():
            return int(self._f(self._params, x.to(device=self.device, dtype=self.dtype)).shape[1])


def _nll_grad(likelihood: Likelihood, out: Tensor, target: Tensor) -> Tensor:
    """``∇_f −log p(target | f)`` per sample, ``(m, C)``."""
    if target.is_floating_point():
        target = target.reshape(out.shape).to(out.dtype)
    with torch.enable_grad():
        o = out.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(likelihood.nll(o, target).sum(), o)
    return g


class MCFisher(GGNOperator):
    """Monte-Carlo Fisher: ``mc_samples`` labels per datum from ``p(y|f)``, drawn once (seeded).

    An unbiased estimate of the true Fisher; converges to :class:`ExactFisher` as
    ``mc_samples → ∞``. Labels of chunk ``i`` come from a generator seeded with ``seed + i``, so
    the operator is one fixed matrix across products.
    """

    def __init__(self, model: nn.Module, data: Data, loss: str = "cross_entropy",
                 mc_samples: int = 1, seed: int = 0, **kwargs) -> None:
        if mc_samples < 1:
            raise ValueError(f"mc_samples must be positive, got {mc_samples}")
        self.mc_samples = mc_samples
        self.seed = seed
        super().__init__(model, data, loss, **kwargs)

    def output_factor(self, out: Tensor, y: Tensor | None, chunk: int) -> Tensor:
        gen = torch.Generator(device=out.device).manual_seed(self.seed + chunk)
        rows = [_nll_grad(self.likelihood, out, self.likelihood.sample(out, gen))
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

    def output_factor(self, out: Tensor, y: Tensor | None, chunk: int) -> Tensor:
        if y is None:
            raise ValueError("the empirical Fisher needs labels: pass data as (X, y)")
        return _nll_grad(self.likelihood, out, y.to(out.device))[:, None, :]

    @property
    def rank_bound(self) -> int:
        return self.num_samples
