"""The per-layer-type interface: how a module's inputs and output gradients become Kronecker
statistics, and how its parameter gradients become one matrix.

Conventions (see docs/DESIGN.md): a layer's weight is viewed as a matrix ``W`` of shape
``(d_G, d_A)`` where ``d_G`` is the number of output features (channels) and ``d_A`` the number of
input features (patch entries), plus one if the layer has a bias (homogeneous coordinate). The
Kronecker factors are ``A = E[ā āᵀ]`` of shape ``(d_A, d_A)`` and ``G = E[g gᵀ]`` of shape
``(d_G, d_G)``; the Fisher block is approximated by ``A ⊗ G`` (column-stacking ``vec``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
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

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        # fixed at construction, like an optimizer's parameter list
        bias = getattr(module, "bias", None)
        self._params = [module.weight] if bias is None else [module.weight, bias]

    # ---------------------------------------------------------------- support
    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        """Why this module cannot be preconditioned (``None`` if it can)."""
        return None

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

    # ---------------------------------------------------------------- what the captures keep
    def record(self, inputs: Tensor, output: Tensor) -> Any:
        """What a forward keeps for the statistics (default: the input rows ``ā``); passed back
        to :meth:`a_rows` and :meth:`g_rows`."""
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
