"""nn.Linear: ``s = W a + b`` on ``(m, ..., d_in)``; extra leading dims count as locations."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import LayerHelper


class LinearHelper(LayerHelper):
    module_type = nn.Linear
    kind = "linear"
    per_sample_rows = True

    def input_rows(self, inputs: Tensor) -> Tensor:
        self.require_checked()
        return self._append_ones(inputs.reshape(-1, inputs.shape[-1]))

    def output_grad_rows(self, grad_output: Tensor) -> Tensor:
        return grad_output.reshape(-1, grad_output.shape[-1])

    def locations(self, grad_output_or_output: Tensor) -> int:
        t = grad_output_or_output
        return int(t[0].numel() // t.shape[-1])

    def reference(self, inputs: Tensor) -> Tensor:
        return F.linear(inputs, self.module.weight, getattr(self.module, "bias", None))

    def formula(self) -> str:
        return "nn.Linear's x Wᵀ + b"
