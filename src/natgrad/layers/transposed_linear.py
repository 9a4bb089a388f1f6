"""A Linear layer with a transposed weight: ``s = a W + b`` with ``W`` of shape ``(d_in, d_out)``.

This is ``transformers.pytorch_utils.Conv1D`` (every attention and MLP projection of GPT-2),
registered by its qualified name so that ``transformers`` is never imported by natgrad. In K-FAC
coordinates the layer matrix is ``V = [Wᵀ | b]`` ``(d_out, d_in + 1)``: the statistics are
exactly those of ``nn.Linear`` (input rows ``ā``, output-gradient rows ``g``, extra leading dims
as locations); only the gradient's layout differs (:meth:`matrix_blocks` is a view ``Wᵀ``).
K-FAC is exact for one datum at one position, as for ``nn.Linear``.
"""

from __future__ import annotations

from torch import Tensor

from .linear import LinearHelper


class TransposedLinearHelper(LinearHelper):
    kind = "linear_transposed"
    # the analysis' per-sample row paths lay the gradient out as W (d_out, d_in); this weight is
    # Wᵀ, so it takes the generic path there
    per_sample_rows = False

    @property
    def out_dim(self) -> int:
        return int(self.module.weight.shape[1])

    @property
    def in_dim(self) -> int:
        return int(self.module.weight.shape[0]) + int(self.has_bias)

    def reference(self, inputs: Tensor) -> Tensor:
        out = inputs @ self.module.weight
        bias = getattr(self.module, "bias", None)
        return out + bias if bias is not None else out

    def formula(self) -> str:
        return "a W + b with W of shape (d_in, d_out)"

    def matrix_blocks(self, tensors: list[Tensor]) -> list[Tensor]:
        """``[Wᵀ (d_out, d_in), b (d_out, 1)]`` (views)."""
        blocks = [tensors[0].T]
        if self.has_bias:
            blocks.append(tensors[1].reshape(-1, 1))
        return blocks

    def split_matrix(self, mat: Tensor) -> list[Tensor]:
        w = mat[:, :-1] if self.has_bias else mat
        out = [w.T.reshape(self.module.weight.shape)]
        if self.has_bias:
            out.append(mat[:, -1].reshape(self.module.bias.shape))
        return out



