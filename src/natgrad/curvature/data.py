"""The analysis' capture: Kronecker statistics from one pass over a data set (no training loop).

The same row math as the optimizer's capture (:mod:`.rows`, the layer helpers), driven by a loop
over chunks instead of the user's own backward: each chunk's forward records the layers' inputs
and output edges, the Fisher kind's output directions are pulled back to the layers in one
batched backward, and the rows are summed.

**Data.** ``data`` is a tuple ``(X,)`` / ``(X, y)``, a ``TensorDataset``, or any iterable of
``(x, y)`` batches (a ``DataLoader``; it must iterate in a fixed order for the Monte-Carlo Fisher to
be one fixed matrix). An input ``x`` may be a tensor (``model(x)``), a tuple of tensors
(``model(*x)``; a list likewise) or a dict of tensors (``model(**x)``); the tuple's or dict's
entries may themselves be tuples, lists or dicts of tensors, passed on as they are. Every tensor is
batch-first with the same leading size (chunks slice all of them alike along dim 0), floating
tensors are cast to the model's dtype, integer and bool ones (token ids, masks) are left as they
are (:func:`to_model`, :func:`model_args`). The Fisher operators of :mod:`natgrad.fisher` read
their data through the same functions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from ..layers import LayerHelper
from ..likelihoods import Likelihood
from .outputs import find_output
from .rows import output_directions, pullback
from .statistics import check_fisher

Data = Iterable[Any] | tuple[Any, ...]

_STOCHASTIC = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._NormBase)


def check_deterministic(model: nn.Module) -> None:
    """``ValueError`` if ``model`` is in train mode and holds Dropout / BatchNorm modules.

    Their train-mode outputs are random or depend on the whole batch, so a Fisher defined per
    sample is not well defined; the user must choose ``model.eval()`` explicitly (we never call it).
    """
    bad = [f"{n or '<model>'} ({type(m).__name__})" for n, m in model.named_modules()
           if isinstance(m, _STOCHASTIC) and m.training]
    if bad:
        raise ValueError(
            "the model is in train mode and contains non-deterministic modules: "
            f"{', '.join(bad)}; call model.eval() before building a Fisher operator"
        )


def map_tensors(x: Any, fn: Callable[[Tensor], Any]) -> Any:
    """``x`` with ``fn`` applied to every tensor in it, recursively through tuples (named ones
    too), lists and dicts; anything else is kept as it is."""
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, dict):
        return {k: map_tensors(v, fn) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        items = [map_tensors(v, fn) for v in x]
        return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)
    return x


def _leaves(x: Any) -> list[Tensor]:
    found: list[Tensor] = []
    map_tensors(x, found.append)
    return found


def batch_size(x: Any) -> int:
    """The leading size of an input: a tensor, or a (nested) tuple / list / dict of tensors, all
    batch-first with the same leading size (``ValueError`` otherwise)."""
    if isinstance(x, Tensor):
        return int(x.shape[0])
    sizes = {int(t.shape[0]) if t.ndim else 0 for t in _leaves(x)}
    if not sizes:
        raise ValueError(f"an input batch must hold a tensor, got {type(x).__name__}")
    if len(sizes) > 1 or 0 in sizes:
        raise ValueError(f"the tensors of an input batch ({type(x).__name__}) must all be batch-"
                         f"first with the same leading size, got leading sizes {sorted(sizes)}")
    return sizes.pop()


def slice_batch(x: Any, s: slice) -> Any:
    """Samples ``s`` of an input: every tensor in it sliced along dim 0."""
    return x[s] if isinstance(x, Tensor) else map_tensors(x, lambda t: t[s])


def to_model(x: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """``x`` on ``device``; floating tensors in ``dtype``, integer and bool ones (token ids,
    masks) unchanged; structures as by :func:`map_tensors`."""
    def move(t: Tensor) -> Tensor:
        return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
    return map_tensors(x, move)


def model_args(x: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` the model is called with for input ``x`` (see the module docstring)."""
    if isinstance(x, dict):
        return (), x
    if isinstance(x, (tuple, list)):
        return tuple(x), {}
    return (x,), {}


def _split(batch: Any) -> tuple[Any, Tensor | None]:
    """``(x, y)`` of one batch: a pair ``(x, y)``, a 1-tuple ``(x,)``, or ``x`` alone."""
    if isinstance(batch, (tuple, list)) and len(batch) in (1, 2):
        return batch[0], (batch[1] if len(batch) == 2 else None)
    return batch, None


def iter_chunks(data: Data, chunk_size: int) -> Iterator[tuple[Any, Tensor | None]]:
    """``(x, y)`` chunks of at most ``chunk_size`` samples (``y`` is ``None`` without labels).

    A tuple is the whole data set, ``(X,)`` or ``(X, y)``; any other iterable yields batches.
    """
    if isinstance(data, torch.utils.data.TensorDataset):
        data = tuple(data.tensors)
    batches: Iterable[Any] = [data] if isinstance(data, tuple) else data
    for batch in batches:
        x, y = _split(batch)
        n = batch_size(x)
        for s in range(0, n, chunk_size):
            yield slice_batch(x, slice(s, s + chunk_size)), (y[s:s + chunk_size]
                                                        if y is not None else None)


def count_samples(data: Data) -> int:
    """``N``: the number of samples in ``data`` (one pass over a loader)."""
    return sum(batch_size(x) for x, _ in iter_chunks(data, 1 << 30))


def _memory_batch(edges_numel: int, memory_elements: int) -> int:
    return max(1, memory_elements // max(1, edges_numel))


class _Call(NamedTuple):
    """What a layer's forward hook keeps (see :func:`pullbacks`)."""

    input: Tensor
    edge: Any
    output: Tensor  # the output's shape and dtype, on the meta device
    record: Any


def pullbacks(
    model: nn.Module,
    layers: dict[str, LayerHelper],
    data: Data,
    likelihood: Likelihood,
    fisher: str,
    *,
    chunk_size: int = 256,
    mc_samples: int = 1,
    seed: int = 0,
    output_key: str | int | None = None,
    memory_elements: int = 1 << 26,
) -> Iterator[tuple[int, dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]]:
    """One forward per chunk of ``data`` and one batched pull-back of the Fisher kind's output
    directions (:func:`~natgrad.curvature.rows.output_directions`; Monte-Carlo labels of chunk
    ``i`` drawn from a generator seeded with ``seed + i``).

    The layers' inputs, output edges and :meth:`LayerHelper.record` are taken inside their
    forward hooks, as the optimizer's capture does (:mod:`.hooks`), so in-place operations after a
    layer (``ReLU(inplace=True)``, ``x += shortcut``) cannot redirect the pull-back.

    Yields:
        ``(m, inputs, outputs, grads, records)``: per layer its input ``(m, ...)``, its output's
        shape (a ``meta`` tensor), the pulled-back gradients (a list of ``R`` tensors shaped like
        the output; layers the output does not depend on are left out) and the helper's
        record of the forward.
    """
    fisher = check_fisher(fisher)
    store: dict[str, _Call] = {}

    def hook(name: str, helper: LayerHelper):
        def fn(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if not output.requires_grad:
                return
            # everything read now, inside the forward: a later in-place op (ReLU(inplace=True),
            # x += shortcut) rewrites the output tensor and its grad_fn, not this edge or record
            x = inputs[0].detach()
            store[name] = _Call(x, get_gradient_edge(output),
                                torch.empty_like(output, device="meta"), helper.record(x, output))
        return fn

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    handles = [hd for n, h in layers.items() for hd in h.register_hooks(hook(n, h))]
    try:
        for i, (x, y) in enumerate(iter_chunks(data, chunk_size)):
            x = to_model(x, device, dtype)
            args, kwargs = model_args(x)
            store.clear()
            with torch.enable_grad():
                out = find_output(model(*args, **kwargs), output_key)
            names = list(store)
            gen = torch.Generator(device=out.device).manual_seed(seed + i)
            directions = output_directions(likelihood, fisher, out, y, gen, samples=mc_samples)
            numel = sum(store[n].output.numel() for n in names)
            with torch.enable_grad():
                grads = pullback(get_gradient_edge(out), [store[n].edge for n in names],
                                 directions, _memory_batch(numel, memory_elements), stack=False)
            yield (batch_size(x), {n: store[n].input for n in names},
                   {n: store[n].output for n in names},
                   {n: g for n, g in zip(names, grads) if g is not None},
                   {n: store[n].record for n in names})
            store.clear()
    finally:
        for h in handles:
            h.remove()


class Gram:
    """``Σ XᵀX`` over batches: the raw rows while there are at most ``d`` of them, then the
    summed ``(d, d)`` Gram matrix, accumulated in float64 from float32-speed products
    (:func:`gram64`: one float32 sum over the ~10⁶ rows of a conv layer's ``G`` is off by ~3e-5).
    Read it as :meth:`moment` (``Σ XᵀX``) or :meth:`root` (rows ``R`` with ``RᵀR = Σ XᵀX``).
    ``diagonal``: the rows are diagonal contributions (:attr:`LayerHelper.diagonal_input`),
    summed into one row."""

    def __init__(self, diagonal: bool = False) -> None:
        self.rows: list[Tensor] = []
        self.gram: Tensor | None = None
        self.diagonal = diagonal
        self.dtype = torch.float32
        self._root: Tensor | None = None

    def add(self, X: Tensor) -> None:
        self.dtype, self._root = X.dtype, None
        if self.diagonal:
            total = X.sum(0, keepdim=True)
            self.rows = [total if not self.rows else self.rows[0] + total]
            return
        if self.gram is None:
            self.rows.append(X)
            if sum(r.shape[0] for r in self.rows) <= X.shape[1]:
                return
            R = torch.cat(self.rows)
            self.rows = []
            self.gram = gram64(R)
        else:
            self.gram += gram64(X)

    @property
    def empty(self) -> bool:
        return not self.rows and self.gram is None

    def moment(self) -> Tensor:
        """``Σ XᵀX`` itself, ``(d, d)``."""
        if self.gram is None:
            return gram64(torch.cat(self.rows)).to(self.dtype)
        return self.gram.to(self.dtype)

    def root(self) -> Tensor:
        """Rows ``R`` with ``RᵀR = Σ XᵀX``: the rows themselves, or a ``(d, d)`` square root."""
        if self.gram is None:
            return torch.cat(self.rows)
        if self._root is None:
            lam, Q = torch.linalg.eigh(self.gram)
            self._root = (Q * lam.clamp_min(0).sqrt()).T.to(self.dtype)
        return self._root


def gram64(X: Tensor, block: int = 4096) -> Tensor:
    """``XᵀX`` in float64 from float32-speed products: one batched ``XᵀX`` per block of
    ``block`` rows, blocks summed in float64 (relative error ~1e-7 on 2·10⁵ rows, against
    ~4e-5 for one float32 product, at the float32 cost; a float64 product costs 2–3×)."""
    n, d = X.shape
    nb = n // block
    head = X[:nb * block].reshape(nb, block, d)
    tail = X[nb * block:]
    out = (tail.T @ tail).double()
    if nb:
        out += torch.bmm(head.transpose(1, 2), head).double().sum(0)
    return out


class StatisticSums:
    """Per layer ``(Σ āāᵀ, Σ ggᵀ, T)`` as :class:`Gram` sums, fed one chunk at a time: its
    layer inputs (:meth:`add_inputs`), then the gradients at the layer outputs of each output
    direction (:meth:`add_direction`). :func:`data_statistics` drives it from its own pass;
    :meth:`natgrad.fisher.rows.RowFisher.from_ggn` feeds it from the pull-backs it makes anyway
    (one pass for both)."""

    def __init__(self, layers: dict[str, LayerHelper]) -> None:
        self.layers = layers
        self.sums: dict[str, list[Any]] = {}
        self.num_samples = 0
        self._kept: dict[str, Any] = {}

    def add_inputs(self, m: int, inputs: dict[str, Tensor], outputs: dict[str, Tensor],
                   records: dict[str, Any] | None = None) -> None:
        """A chunk of ``m`` samples: per layer its input ``(m, ...)`` and its output (or a tensor
        of the output's shape, e.g. on the ``meta`` device: only the shape is read by the
        Linear / Conv2d helpers); layers not in :attr:`layers` are ignored. ``records``: the
        helpers' :meth:`LayerHelper.record` taken during the forward (made here otherwise)."""
        self.num_samples += m
        self._kept = {}
        for n, a in inputs.items():
            helper = self.layers.get(n)
            if helper is None:
                continue
            self._kept[n] = (records[n] if records is not None and n in records
                             else helper.record(a, outputs[n]))
            s = self.sums.setdefault(n, [Gram(helper.diagonal_input), Gram(),
                                         helper.locations(outputs[n])])
            s[0].add(helper.a_rows(self._kept[n]))

    def add_direction(self, grads: dict[str, Tensor]) -> None:
        """One output direction of the current chunk: layer name → the gradient at its output
        ``(m, ...)``."""
        self.add_directions({n: g[None] for n, g in grads.items()})

    def add_directions(self, grads: dict[str, Tensor]) -> None:
        """Several output directions of the current chunk at once: layer name → the gradients
        at its output ``(R, m, ...)`` (one Gram product over all ``R · m`` rows instead of
        ``R`` smaller ones)."""
        for n, g in grads.items():
            if n in self._kept:
                self.sums[n][1].add(self.layers[n].g_rows(g, self._kept[n]))

    def result(self) -> tuple[dict[str, tuple[Gram, Gram, int]], int]:
        """``(stats, N)`` as :func:`data_statistics` returns them."""
        stats = {n: (s[0], s[1], s[2]) for n, s in self.sums.items() if not s[1].empty}
        return stats, self.num_samples


def data_statistics(
    model: nn.Module,
    layers: dict[str, LayerHelper],
    data: Data,
    likelihood: Likelihood,
    fisher: str = "exact",
    **kwargs: Any,
) -> tuple[dict[str, tuple[Gram, Gram, int]], int]:
    """Per layer ``(Σ āāᵀ, Σ ggᵀ, T)`` over ``data`` as :class:`Gram` sums (``T``: locations per
    sample), and ``N``, the number of samples. ``kwargs``: those of :func:`pullbacks`."""
    check_deterministic(model)
    sums = StatisticSums(layers)
    for m, inputs, outputs, grads, records in pullbacks(model, layers, data, likelihood,
                                                        fisher, **kwargs):
        sums.add_inputs(m, inputs, outputs, records)
        R = max((len(g) for g in grads.values()), default=0)
        if R * sum(g[0].numel() for g in grads.values()) <= STACK_ELEMENTS:
            sums.add_directions({n: torch.stack(g) for n, g in grads.items()})
            continue
        for r in range(R):  # one direction at a time: no (R, m, ...) copy of the gradients
            sums.add_direction({n: g[r] for n, g in grads.items()})
    return sums.result()


#: :func:`data_statistics` stacks a chunk's output directions into one Gram product per layer
#: while they hold at most this many elements (the stacked copy's memory), else adds them one by
#: one
STACK_ELEMENTS = 1 << 23
