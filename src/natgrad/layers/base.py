"""The per-layer-type interface: how a module's inputs and output gradients become Kronecker
statistics, and how its parameter gradients become one matrix.

Conventions (see docs/DESIGN.md): a layer's weight is viewed as a matrix ``W`` of shape
``(d_G, d_A)`` where ``d_G`` is the number of output features (channels) and ``d_A`` the number of
input features (patch entries), plus one if the layer has a bias (homogeneous coordinate). The
Kronecker factors are ``A = E[ā āᵀ]`` of shape ``(d_A, d_A)`` and ``G = E[g gᵀ]`` of shape
``(d_G, d_G)``; the Fisher block is approximated by ``A ⊗ G`` (column-stacking ``vec``).
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..blocks import CurvatureBlock, KroneckerBlock
from ..factors import make_factor


class LayerHelper(ABC):
    """Statistics and reshapes for one module.

    Subclasses handle one module type; register them in :data:`natgrad.layers.HELPERS`.
    """

    module_type: ClassVar[type[nn.Module]]
    kind: ClassVar[str]
    #: the input statistic is exactly diagonal (one-hot inputs): :meth:`a_rows` gives rows whose
    #: column sums are the diagonal of ``Σ ā āᵀ`` instead of the rows ``ā`` themselves
    diagonal_input: ClassVar[bool] = False
    #: a sample's weight gradient is ``Σ_t g_t ā_tᵀ`` of its :meth:`input_rows` and
    #: :meth:`output_grad_rows` (Linear, Conv2d): the analysis' fast exact diagonal and traces
    #: use it (:mod:`natgrad.fisher.layer_diagonal`); other layers take the generic path
    per_sample_rows: ClassVar[bool] = False

    def __init__(self, module: nn.Module, verify: str | None = None) -> None:
        self.module = module
        # fixed at construction, like an optimizer's parameter list
        bias = getattr(module, "bias", None)
        self._params = [module.weight] if bias is None else [module.weight, bias]
        #: the layer's name in its model (set by the registration; used in messages)
        self.name = ""
        #: why the module must be checked on its first forward (``None``: trusted)
        self.pending = verify
        #: why the check failed: the layer must not be preconditioned (``None``: no refusal)
        self.refusal: str | None = None
        #: what the check found, for the registration summary
        self.note: str | None = None
        #: the block reads the gradient at the input of the module's first child (the
        #: normalization result inside a norm + activation module), not at its output
        self.inner_target = False
        if verify is not None:
            self.per_sample_rows = False  # the analysis' fast paths assume the plain formula
        self._inside = False
        self._inner: Tensor | None = None

    # ---------------------------------------------------------------- support
    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        """Why this module cannot be preconditioned (``None`` if it can)."""
        return None

    @classmethod
    def variant(cls, module: nn.Module) -> type[LayerHelper]:
        """The helper class for this configuration of the module type (default: ``cls``; e.g.
        grouped convolutions get their own helper)."""
        return cls

    # ---------------------------------------------------------------- what the module computes
    def reference(self, inputs: Tensor) -> Tensor:
        """The helper's formula on ``inputs``: what a module of the registered type computes,
        without side effects (no running statistics are updated)."""
        raise NotImplementedError

    def variants(self) -> tuple[str, ...]:
        """The formulas :meth:`verify` tries, by name (``"plain"`` first); a helper that knows
        other layouts of its layer adds theirs and :meth:`use_variant` switches to them."""
        return ("plain",)

    def use_variant(self, name: str) -> None:
        """Compute :meth:`reference` and the statistics for variant ``name`` from now on (the
        base helper knows only ``"plain"``)."""
        if name != "plain":
            raise ValueError(f"{type(self).__name__} has no variant {name!r}")

    def verify(self, inputs: Tensor, output: Any, inner: Tensor | None) -> None:
        """Check a candidate module on one forward (see :mod:`natgrad.layers.registry`).

        Its output (or ``inner``, the input of its first child module, for a norm followed by
        an activation) must equal :meth:`reference` of one of :meth:`variants` on ``inputs``;
        otherwise the layer is refused (:attr:`refusal`, and a warning). A forward without a
        finite output entry decides nothing (the check waits for the next one)."""
        if isinstance(output, Tensor) and not bool(torch.isfinite(output.detach()).any()):
            return
        why = self.pending
        self.pending = None
        if isinstance(output, Tensor):
            with torch.no_grad():
                for variant in self.variants():
                    self.use_variant(variant)
                    try:
                        ref = self.reference(inputs.detach())
                    except (RuntimeError, ValueError, IndexError, TypeError):
                        continue
                    for target, is_inner in ((output, False), (inner, True)):
                        if target is not None and _close(ref, target.detach()):
                            self.inner_target = is_inner
                            self.note = f"verified ({why}): " + self.describe_variant(
                                variant, is_inner)
                            return
        self.use_variant("plain")
        self.pending = why
        self.refuse(f"its forward does not compute {self.formula()} (checked on its first "
                    "forward)")

    def refuse(self, why: str) -> None:
        """Refuse a candidate layer (:attr:`refusal`), with a warning naming it."""
        self.refusal = f"{self.pending}, and {why}: not preconditioned"
        self.pending = None
        warnings.warn(f"natgrad: layer {self.name or type(self.module).__name__!r}: "
                      f"{self.refusal}", RuntimeWarning, stacklevel=5)

    def formula(self) -> str:
        """The formula :meth:`reference` computes, in words (for messages)."""
        return f"what {type(self).__name__} assumes"

    def describe_variant(self, variant: str, inner: bool) -> str:
        """A summary phrase for what :meth:`verify` found."""
        what = self.formula() if variant == "plain" else variant
        return (f"{what}, followed by other modules: the block is taken at its result (the "
                "pre-activation gradient)" if inner else what)

    # ---------------------------------------------------------------- hooks
    def register_hooks(self, on_forward: Callable[[nn.Module, tuple[Any, ...], Any], Any]
                       ) -> list[Any]:
        """Attach forward hooks that call ``on_forward(module, inputs, target)`` after each call
        of the module, ``target`` being the tensor whose gradient the statistics read (the
        module output, or for :attr:`inner_target` the normalization result inside it). A
        candidate module is verified on its first call; a refused one calls nothing.

        Returns the handles (``.remove()`` detaches them)."""
        handles = [self.module.register_forward_hook(self._forward_hook(on_forward))]
        children = list(self.module.children())
        if children and (self.pending is not None or self.inner_target):
            handles.append(self.module.register_forward_pre_hook(self._enter))
            handles += [c.register_forward_pre_hook(self._catch) for c in children]
        return handles

    def _enter(self, module: nn.Module, args: Any) -> None:
        self._inside, self._inner = True, None

    def _catch(self, module: nn.Module, args: tuple[Any, ...]) -> Any:
        if (not self._inside or self._inner is not None or not args
                or (self.pending is None and not self.inner_target)):
            return None
        x = args[0]
        if not isinstance(x, Tensor):
            return None
        self._inner = x
        # the child gets a copy: an in-place activation cannot overwrite the tensor (and its
        # gradient edge) the statistics are read at
        return (x.clone(), *args[1:]) if x.requires_grad else None

    def _forward_hook(self, on_forward: Callable) -> Callable:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
            inner, self._inner, self._inside = self._inner, None, False
            if self.refusal is not None:
                return None
            if self.pending is not None:
                if _wrapped(output):  # a torch.func transform: the captures ignore it
                    return on_forward(module, inputs, output)
                if not inputs or not isinstance(inputs[0], Tensor):
                    self.refuse("it was called without a positional tensor input, so what it "
                                "computes cannot be checked")
                    return None
                self.verify(inputs[0], output, inner)
                if self.refusal is not None or self.pending is not None:
                    return None
            target = inner if self.inner_target else output
            if target is None:
                return None
            return on_forward(module, inputs, target)

        return hook

    # ---------------------------------------------------------------- shapes
    @property
    def has_bias(self) -> bool:
        return len(self._params) > 1

    @property
    def params(self) -> list[nn.Parameter]:
        """The parameters this helper preconditions, weight first (as at construction)."""
        return list(self._params)

    @property
    def out_dim(self) -> int:
        """``d_G``: size of the output-gradient factor."""
        return int(self.module.weight.shape[0])

    @property
    def in_dim(self) -> int:
        """``d_A``: size of the input factor (bias coordinate included)."""
        return int(self.module.weight[0].numel()) + int(self.has_bias)

    @property
    def num_params(self) -> int:
        return self.out_dim * self.in_dim

    # ---------------------------------------------------------------- curvature
    def make_block(self, strategy: str, options: Any, dtype: torch.dtype,
                   device: torch.device) -> CurvatureBlock:
        """The layer's curvature block: ``A ⊗ G`` with factors of ``strategy`` (a helper whose
        layer needs another structure overrides this)."""
        return KroneckerBlock(
            make_factor(strategy, self.in_dim, options, dtype=dtype, device=device),
            make_factor(strategy, self.out_dim, options, dtype=dtype, device=device),
        )

    # ---------------------------------------------------------------- statistics
    @abstractmethod
    def input_rows(self, inputs: Tensor) -> Tensor:
        """Rows ``ā`` of the input statistics.

        Args:
            inputs: the module's input, batch first, ``(m, ...)``.

        Returns:
            ``(n, d_A)`` with ``n = m · T`` (``T`` locations per sample; 1 for Linear); the bias
            coordinate (a column of ones) is appended when the layer has a bias.
        """

    @abstractmethod
    def output_grad_rows(self, grad_output: Tensor) -> Tensor:
        """Rows ``g`` of the output-gradient statistics, ``(n, d_G)``, from ``(m, ...)``."""

    def output_grad_matrix(self, grad_output: Tensor) -> Tensor:
        """The rows of :meth:`output_grad_rows` per sample, ``(m, T, d_G)`` (may be a view)."""
        return self.output_grad_rows(grad_output).reshape(grad_output.shape[0], -1,
                                                          self.out_dim)

    @abstractmethod
    def locations(self, grad_output_or_output: Tensor) -> int:
        """``T``: the number of spatial locations per sample (1 for Linear)."""

    def require_checked(self) -> None:
        """``RuntimeError`` when the statistics would be read from a candidate module that has
        not been checked (or was refused): only the hooks of :meth:`register_hooks` check it."""
        if self.pending is not None or self.refusal is not None:
            raise RuntimeError(
                f"natgrad: layer {self.name or type(self.module).__name__!r}: "
                + (self.refusal or f"{self.pending}; its statistics are read only after its "
                   "first forward through natgrad's hooks has checked what it computes"))

    # ---------------------------------------------------------------- what the captures keep
    def record(self, inputs: Tensor, output: Tensor) -> Any:
        """What a forward keeps for the statistics (default: the input rows ``ā``); passed back
        to :meth:`a_rows` and :meth:`g_rows`."""
        self.require_checked()
        return self.input_rows(inputs)

    def a_rows(self, record: Any) -> Tensor:
        """The ``A`` statistic's rows from a :meth:`record` (``(n, d_A)``; column sums of the
        diagonal for :attr:`diagonal_input` layers)."""
        return record

    def g_rows(self, grad_output: Tensor, record: Any) -> Tensor:
        """The ``G`` statistic's rows from the output gradients of ``R`` directions
        ``(R, m, ...)`` and the forward's :meth:`record`: ``(R · n, d_G)``."""
        return self.output_grad_rows(grad_output.flatten(0, 1))

    def input_scale(self, num_samples: int) -> float:
        """``A = input_scale · XᵀX`` for the ``X`` of :meth:`input_rows` over ``num_samples``."""
        return 1.0 / num_samples

    def output_grad_scale(self, num_samples: int, locations: int) -> float:
        """``G = output_grad_scale · YᵀY``; KFC convention ``G = (1/T) E[Σ_t g_t g_tᵀ]``."""
        return 1.0 / (num_samples * locations)

    # ---------------------------------------------------------------- gradients
    def matrix_blocks(self, tensors: list[Tensor]) -> list[Tensor]:
        """Tensors shaped like :attr:`params` as the column blocks of the ``(d_G, d_A)`` matrix
        ``[W | b]``: ``[(d_G, d_A − 1), (d_G, 1)]`` (or ``[(d_G, d_A)]`` without bias).

        Contiguous inputs give views (writing into a block writes into the tensor)."""
        blocks = [tensors[0].reshape(self.out_dim, -1)]
        if self.has_bias:
            blocks.append(tensors[1].reshape(-1, 1))
        return blocks

    def grad_matrix(self, grads: list[Tensor] | None = None) -> Tensor:
        """The gradient as a ``(d_G, d_A)`` matrix ``[∇W | ∇b]``.

        Args:
            grads: tensors shaped like :attr:`params` (default: their ``.grad``).
        """
        if grads is None:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        blocks = self.matrix_blocks(grads)
        return torch.cat(blocks, dim=1) if len(blocks) > 1 else blocks[0]

    def split_matrix(self, mat: Tensor) -> list[Tensor]:
        """Inverse of :meth:`grad_matrix`: a ``(d_G, d_A)`` matrix as tensors shaped like params."""
        w = self.module.weight
        if self.has_bias:
            return [mat[:, :-1].reshape(w.shape), mat[:, -1].reshape(self.module.bias.shape)]
        return [mat.reshape(w.shape)]

    def _append_ones(self, rows: Tensor) -> Tensor:
        if not self.has_bias:
            return rows
        return torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)


def _wrapped(t: Any) -> bool:
    return isinstance(t, Tensor) and bool(torch._C._functorch.is_functorch_wrapped_tensor(t))


def _close(ref: Tensor, out: Tensor) -> bool:
    """``ref`` equals ``out`` up to the rounding of ``out``'s dtype (relative to its size;
    non-finite entries must agree)."""
    if ref.shape != out.shape:
        return False
    out = out.to(ref.dtype)
    finite = torch.isfinite(out)
    scale = float(out[finite].abs().max()) if bool(finite.any()) else 1.0
    tol = 1e-4 if ref.dtype == torch.float64 or ref.dtype == torch.float32 else 1e-2
    return bool(torch.isclose(ref, out, rtol=tol, atol=tol * scale, equal_nan=True).all())
