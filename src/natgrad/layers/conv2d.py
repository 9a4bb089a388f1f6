"""nn.Conv2d via KFC (Grosse & Martens 2016, "expand" convention).

The weight ``(c_out, c_in, kh, kw)`` is viewed as ``(c_out, c_in·kh·kw)``; the inputs are the
unfolded patches, one row per (sample, output location). With ``T`` locations per sample,
``A = (1/m) Σ_n Σ_t ā_{n,t} ā_{n,t}ᵀ`` and ``G = (1/(m T)) Σ_n Σ_t g_{n,t} g_{n,t}ᵀ``; this is exact
for the Fisher block when ``T = 1`` and the layer sees one datum.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import LayerHelper


class Conv2dHelper(LayerHelper):
    module_type = nn.Conv2d
    kind = "conv2d"

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        assert isinstance(module, nn.Conv2d)
        if module.groups != 1:
            return f"groups={module.groups} (only groups=1 is preconditioned)"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (only 'zeros' is preconditioned)"
        return None

    def input_rows(self, inputs: Tensor) -> Tensor:
        m = self.module
        x = inputs
        if isinstance(m.padding, str) and m.padding == "same":
            # exact "same" padding, including the asymmetric case
            pads = []
            for d, k in zip(reversed(m.dilation), reversed(m.kernel_size)):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
            padding = (0, 0)
        elif isinstance(m.padding, str):  # "valid"
            padding = (0, 0)
        else:
            padding = m.padding
        patches = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (m·T, c_in·kh·kw)
        return self._append_ones(rows)

    def output_grad_rows(self, grad_output: Tensor) -> Tensor:
        c = grad_output.shape[1]
        return grad_output.movedim(1, -1).reshape(-1, c)

    def locations(self, grad_output_or_output: Tensor) -> int:
        return int(grad_output_or_output.shape[-1] * grad_output_or_output.shape[-2])
