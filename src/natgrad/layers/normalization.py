"""Normalization layers' affine parameters: ``y = γ ⊙ x̂ + β`` per channel.

``nn.LayerNorm`` (channels: the ``normalized_shape`` entries; positions: the other dims),
``nn.BatchNorm1d/2d/3d`` and ``nn.GroupNorm`` (channels: dim 1; positions: the spatial dims).
Their curvature is the exact per-channel 2×2 block of ``(γ_c, β_c)``
(:class:`~natgrad.blocks.scale_shift.ScaleShiftBlock`), built from the per-sample gradients
``u_c = Σ_t g_{t,c} x̂_{t,c}``, ``v_c = Σ_t g_{t,c}``; ``x̂`` is recomputed from the layer input
with the module's own normalization (nothing is read from the module's output). A layer without
a shift (``bias=False``) gets the exact per-channel ``1 × 1`` block of ``γ_c`` alone (``u_c``).

**Variants found by verification** (:mod:`natgrad.layers.registry`): a ``LayerNorm`` subclass
whose output is LayerNorm over dim 1 of ``(B, C, ...)`` (timm's ``LayerNorm2d``: normalise
``x.movedim(1, -1)``) is handled as *channels-first*; a norm subclass that feeds its normalization
result into child modules (timm's ``BatchNormAct2d``: ``act(drop(BN(x)))``) gets its block from the
gradient at that result — the pre-activation gradient the affine pair actually receives — read at
the input of its first child.

**BatchNorm, train vs eval mode.** ``x̂`` always uses what the module uses: the running
statistics in eval mode, the batch statistics in train mode (or without running statistics). In
eval mode the block is the exact per-channel block of the Fisher (tested against the dense
Fisher, as are LayerNorm and GroupNorm). In train mode the batch mean and variance couple the
samples, so a sample's output depends on the others: natgrad then treats the gradient of the
summed loss at each sample's output as that sample's gradient (the usual K-FAC practice) — the
same approximation every other layer of a network with train-mode BatchNorm gets.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..blocks import CurvatureBlock
from ..blocks.scale_shift import ScaleShiftBlock, ScaleShiftFactor
from .base import LayerHelper


class NormHelper(LayerHelper):
    """Shared by the normalization layers: subclasses say how ``x̂`` is computed and which dims
    are channels."""

    kind = "norm"
    #: ``x̂`` has its channels at dim 1 (BatchNorm, GroupNorm) rather than last (LayerNorm)
    channels_first = True

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        if getattr(module, "weight", None) is None:
            return "no affine parameters (affine=False / elementwise_affine=False)"
        return None

    @property
    def out_dim(self) -> int:
        return int(self.module.weight.numel())

    @property
    def in_dim(self) -> int:
        """``2`` for the pair ``(γ_c, β_c)``, ``1`` for a scale alone."""
        return 1 + int(self.has_bias)

    def make_block(self, strategy: str, options: Any, dtype: torch.dtype,
                   device: torch.device) -> CurvatureBlock:
        return ScaleShiftBlock(ScaleShiftFactor(self.in_dim * self.out_dim, dtype=dtype,
                                                device=device, width=self.in_dim))

    # ---------------------------------------------------------------- what the module computes
    def normalized(self, inputs: Tensor) -> Tensor:
        """``x̂`` as the module computes it, shaped like ``inputs``."""
        raise NotImplementedError

    def reference(self, inputs: Tensor) -> Tensor:
        """``γ ⊙ x̂ + β``, channels broadcast as the layer lays them out."""
        w, b = self.module.weight, getattr(self.module, "bias", None)
        xhat = self.normalized(inputs.to(w.dtype))
        if self.channels_first:
            shape = (-1,) + (1,) * (inputs.dim() - 2)
            w = w.reshape(shape)
            b = b.reshape(shape) if b is not None else None
        return xhat * w + b if b is not None else xhat * w

    def formula(self) -> str:
        return f"{self.module_type.__name__}'s γ ⊙ x̂ + β"

    # ---------------------------------------------------------------- statistics

    def _channels_last(self, t: Tensor) -> Tensor:
        """``(m, positions, C)`` view of a tensor shaped like the input (or ``(R, m, ...)``
        with ``lead=2`` handled by the caller)."""
        if self.channels_first:
            t = t.movedim(1, -1)
        return t.reshape(t.shape[0], -1, self.out_dim)

    def record(self, inputs: Tensor, output: Tensor) -> Any:
        self.require_checked()
        with torch.no_grad():
            return self._channels_last(self.normalized(inputs.to(self.module.weight.dtype)))

    def a_rows(self, record: Any) -> Tensor:
        return record.new_zeros(record.shape[0], 0)  # the block needs no input statistic

    def input_rows(self, inputs: Tensor) -> Tensor:
        return self.record(inputs, inputs).reshape(-1, self.out_dim)

    def output_grad_rows(self, grad_output: Tensor) -> Tensor:
        return self._channels_last(grad_output).reshape(-1, self.out_dim)

    def g_rows(self, grad_output: Tensor, record: Any) -> Tensor:
        """Per sample and direction ``[u_1..u_C, v_1..v_C]``: ``(R · m, 2C)`` (``[u_1..u_C]``
        without a shift)."""
        R, m = grad_output.shape[:2]
        g = self._channels_last(grad_output.flatten(0, 1)).reshape(R, m, -1, self.out_dim)
        u = (g * record.to(g.dtype)).sum(2)
        parts = [u, g.sum(2)] if self.has_bias else [u]
        return torch.cat(parts, dim=-1).reshape(R * m, self.in_dim * self.out_dim)

    def locations(self, grad_output_or_output: Tensor) -> int:
        return int(grad_output_or_output[0].numel() // self.out_dim)

    def output_grad_scale(self, num_samples: int, locations: int) -> float:
        return 1.0 / num_samples  # the rows are per-sample gradients already

    # ---------------------------------------------------------------- gradients
    def matrix_blocks(self, tensors: list[Tensor]) -> list[Tensor]:
        return [t.reshape(-1, 1) for t in tensors[:self.in_dim]]

    def split_matrix(self, mat: Tensor) -> list[Tensor]:
        return [mat[:, i].reshape(p.shape) for i, p in enumerate(self.params)]


class LayerNormHelper(NormHelper):
    module_type = nn.LayerNorm
    channels_first = False

    def variants(self) -> tuple[str, ...]:
        return ("plain", CHANNELS_FIRST)

    def use_variant(self, name: str) -> None:
        self.channels_first = name == CHANNELS_FIRST

    def normalized(self, inputs: Tensor) -> Tensor:
        m = self.module
        if self.channels_first:  # LayerNorm over dim 1 of (B, C, ...)
            return F.layer_norm(inputs.movedim(1, -1), m.normalized_shape, None, None,
                                m.eps).movedim(-1, 1)
        return F.layer_norm(inputs, m.normalized_shape, None, None, m.eps)


#: the LayerNorm variant that normalises dim 1 (timm's ``LayerNorm2d``)
CHANNELS_FIRST = "channels-first LayerNorm (normalised over dim 1: x.movedim(1, -1))"


class BatchNormHelper(NormHelper):
    module_type = nn.modules.batchnorm._BatchNorm

    def normalized(self, inputs: Tensor) -> Tensor:
        m = self.module
        batch_stats = m.training or m.running_mean is None
        if batch_stats:  # what the module uses in train mode, without touching its buffers
            return F.batch_norm(inputs, None, None, None, None, True, 0.0, m.eps)
        return F.batch_norm(inputs, m.running_mean, m.running_var, None, None, False, 0.0,
                            m.eps)


class GroupNormHelper(NormHelper):
    module_type = nn.GroupNorm

    def normalized(self, inputs: Tensor) -> Tensor:
        m = self.module
        return F.group_norm(inputs, m.num_groups, None, None, m.eps)
