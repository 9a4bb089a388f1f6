"""nn.Embedding: ``s = Wᵀ onehot(i)`` for token ids ``i`` ``(m, ...)``; every id is a location.

In K-FAC coordinates the weight ``(vocab, d)`` is the matrix ``V = Wᵀ`` of shape
``(d_G, d_A) = (d, vocab)`` (no bias). The inputs are one-hot, so the input factor is *exactly
diagonal*: ``A = (1/m) Σ_{n,t} e_{i_{n,t}} e_{i_{n,t}}ᵀ = diag(counts) / m`` — kept as a
:class:`~natgrad.factors.DiagonalFactor` whatever the strategy, ``O(vocab)``, never ``vocab²``;
``G = (1/(m T)) Σ_{n,t} g_{n,t} g_{n,t}ᵀ`` uses the chosen strategy. The damped solve is exact
(:func:`natgrad.factors.kronecker.solve`, diagonal ``A``): columns (tokens) decouple.

``padding_idx``: its token is left out of both statistics (not counted in ``A``, its positions'
rows zeroed in ``G``); its weight row gets no gradient from torch, so its direction is zero.
K-FAC is exact for one datum at one position (``A = e eᵀ``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..blocks import CurvatureBlock, KroneckerBlock
from ..factors import DiagonalFactor, make_factor
from .base import LayerHelper


class EmbeddingHelper(LayerHelper):
    module_type = nn.Embedding
    kind = "embedding"
    diagonal_input = True

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        assert isinstance(module, nn.Embedding)
        if module.sparse:
            return "sparse=True (sparse gradients are not preconditioned)"
        return None

    @property
    def out_dim(self) -> int:
        return int(self.module.weight.shape[1])

    @property
    def in_dim(self) -> int:
        return int(self.module.weight.shape[0])

    def make_block(self, strategy: str, options: Any, dtype: torch.dtype,
                   device: torch.device) -> CurvatureBlock:
        return KroneckerBlock(
            DiagonalFactor(self.in_dim, dtype=dtype, device=device),
            make_factor(strategy, self.out_dim, options, dtype=dtype, device=device),
        )

    def reference(self, inputs: Tensor) -> Tensor:
        return F.embedding(inputs, self.module.weight, self.module.padding_idx)

    def formula(self) -> str:
        return "nn.Embedding's row lookup"

    # ---------------------------------------------------------------- statistics
    def _valid(self, ids: Tensor) -> Tensor | None:
        pad = self.module.padding_idx
        return None if pad is None else ids.reshape(-1) != pad

    def input_rows(self, inputs: Tensor) -> Tensor:
        """One row ``(1, vocab)``: the token counts (the diagonal of ``Σ ā āᵀ``)."""
        self.require_checked()
        ids = inputs.reshape(-1)
        valid = self._valid(inputs)
        if valid is not None:
            ids = ids[valid]
        dtype = self.module.weight.dtype if self.module.weight.is_floating_point() else None
        counts = torch.bincount(ids, minlength=self.in_dim).to(dtype or torch.float32)
        return counts.unsqueeze(0)

    def record(self, inputs: Tensor, output: Tensor) -> Any:
        return self.input_rows(inputs), self._valid(inputs)

    def a_rows(self, record: Any) -> Tensor:
        return record[0]

    def output_grad_rows(self, grad_output: Tensor) -> Tensor:
        return grad_output.reshape(-1, grad_output.shape[-1])

    def g_rows(self, grad_output: Tensor, record: Any) -> Tensor:
        rows = self.output_grad_rows(grad_output.flatten(0, 1))
        valid = record[1]
        if valid is None:
            return rows
        mask = valid.repeat(grad_output.shape[0]).to(rows.dtype)
        return rows * mask.unsqueeze(1)

    def locations(self, grad_output_or_output: Tensor) -> int:
        t = grad_output_or_output
        return int(t[0].numel() // t.shape[-1])

    # ---------------------------------------------------------------- gradients
    def matrix_blocks(self, tensors: list[Tensor]) -> list[Tensor]:
        """The weight's ``(vocab, d)`` tensor as the ``(d, vocab)`` matrix ``V = Wᵀ`` (a view)."""
        return [tensors[0].T]

    def split_matrix(self, mat: Tensor) -> list[Tensor]:
        return [mat.T]
