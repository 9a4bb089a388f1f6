"""RMSNorm: ``y = γ ⊙ x / sqrt(mean(x²) + ε)`` over the last dims, a scale and no shift.

``nn.RMSNorm`` (normalised over ``normalized_shape``) and the RMSNorm modules of ``transformers``
models (``LlamaRMSNorm``, ``Qwen2RMSNorm``, …: a ``weight`` of the hidden size, ``ε`` in
``variance_epsilon`` or ``eps``), matched by the name pattern ``"transformers.*RMSNorm"`` and
checked on their first forward — e.g. Gemma's ``(1 + γ) ⊙ x̂`` is refused, never mis-blocked.

The curvature is the exact per-channel ``1 × 1`` Fisher block of ``γ_c``, ``E[u_c²]`` with
``u_c = Σ_t g_{t,c} x̂_{t,c}`` (:class:`~natgrad.blocks.scale_shift.ScaleShiftBlock` of width 1):
what :class:`~natgrad.layers.normalization.NormHelper` does for a layer without a shift.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .normalization import NormHelper


class RMSNormHelper(NormHelper):
    module_type = nn.RMSNorm
    channels_first = False

    def _dims(self) -> int:
        shape = getattr(self.module, "normalized_shape", None)
        return len(shape) if shape is not None else 1

    def _eps(self, dtype: torch.dtype) -> float:
        m = self.module
        eps = getattr(m, "eps", getattr(m, "variance_epsilon", None))
        return torch.finfo(dtype).eps if eps is None else float(eps)

    def normalized(self, inputs: Tensor) -> Tensor:
        dims = tuple(range(-self._dims(), 0))
        ms = inputs.pow(2).mean(dims, keepdim=True)
        return inputs * torch.rsqrt(ms + self._eps(inputs.dtype))

    def formula(self) -> str:
        return "RMSNorm's γ ⊙ x / sqrt(mean(x²) + ε)"
