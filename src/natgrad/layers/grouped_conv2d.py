"""``nn.Conv2d`` with ``groups > 1`` (grouped and depthwise convolutions) via per-group KFC.

Group ``j`` is a convolution of its own (input channels ``[j·c_in/g, (j+1)·c_in/g)`` to output
channels ``[j·c_out/g, (j+1)·c_out/g)``), so it gets the Conv2d factors of its own patches and
output gradients: ``A_j = (1/m) Σ_{n,t} ā_{n,t,j} ā_{n,t,j}ᵀ`` and ``G_j = (1/(m T)) Σ_{n,t}
g_{n,t,j} g_{n,t,j}ᵀ``; the block is ``blockdiag_j(A_j ⊗ G_j)``
(:class:`~natgrad.blocks.grouped.GroupedKroneckerBlock`). The layer matrix is Conv2d's, ``V =
[W.reshape(c_out, −1) | b]`` with ``d_A = (c_in/g)·kh·kw [+ 1]``. Exact (each group's Fisher
block) for one datum and one output location, as for Conv2d; depthwise is ``g = c_in``.

For the analysis' per-sample paths (:attr:`~natgrad.layers.base.LayerHelper.per_sample_rows`)
every (location, group) pair is a row: ``A_n`` ``(T·g, d_A)`` holds group ``j``'s patch and ``G_n``
``(T·g, c_out)`` group ``j``'s output gradient in its own channels, zero elsewhere, so that
``G_nᵀ A_n`` is the per-sample gradient of ``V`` with each group in its own rows (``g`` times the
memory of a Conv2d's ``G_n``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..blocks import CurvatureBlock
from ..blocks.grouped import GroupedKroneckerBlock
from ..factors import make_factor
from .conv2d import Conv2dHelper


class GroupedConv2dHelper(Conv2dHelper):
    kind = "conv2d_grouped"

    @property
    def groups(self) -> int:
        return int(self.module.groups)

    def make_block(self, strategy: str, options: Any, dtype: torch.dtype,
                   device: torch.device) -> CurvatureBlock:
        g, kw = self.groups, {"dtype": dtype, "device": device}
        return GroupedKroneckerBlock(
            [make_factor(strategy, self.in_dim, options, **kw) for _ in range(g)],
            [make_factor(strategy, self.out_dim // g, options, **kw) for _ in range(g)])

    def input_rows(self, inputs: Tensor) -> Tensor:
        """``(n, g·d_A)``: each group's patch (and a one for the bias) side by side."""
        patches = super().input_rows(inputs)  # (n, c_in·kh·kw [+ 1])
        n, d = patches.shape[0], self.in_dim - int(self.has_bias)
        per_group = patches[:, :self.groups * d].reshape(n, self.groups, d)
        if self.has_bias:
            per_group = torch.cat([per_group, per_group.new_ones(n, self.groups, 1)], dim=2)
        return per_group.reshape(n, self.groups * self.in_dim)

    def output_grad_matrix(self, grad_output: Tensor) -> Tensor:
        """``(m, T·g, c_out)``: group ``j``'s gradient at row ``(t, j)``, in its channels only."""
        m, c = grad_output.shape[:2]
        g = self.groups
        G = grad_output.flatten(2).transpose(1, 2)  # (m, T, c_out)
        T = G.shape[1]
        out = G.new_zeros(m, T, g, g, c // g)
        out.diagonal(dim1=2, dim2=3).copy_(G.reshape(m, T, g, c // g).transpose(2, 3))
        return out.reshape(m, T * g, c)
