"""Shared by tests/layers: natgrad's own replicas of timm's layer patterns (timm itself does not
import with this torch build) and the case table of tiny float64 nets, one per layer type, where
K-FAC is exact for the layer's block (one datum and one location for Kronecker layers; any data
for the exact per-channel norm blocks)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

f64 = torch.float64


# ---------------------------------------------------------------- replicas of timm's patterns
class LayerNorm2d(nn.LayerNorm):
    """timm.layers.LayerNorm2d: LayerNorm over the channels of ``(B, C, H, W)`` by permuting."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.BatchNormAct2d: ``act(drop(BN(x)))`` with the BN computed functionally."""

    def __init__(self, num_features: int, act: type[nn.Module] = nn.ReLU, inplace: bool = True,
                 drop: float = 0.0, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.act = act(inplace=inplace) if act is nn.ReLU else act()

    def forward(self, x: Tensor) -> Tensor:
        use_batch = self.training or self.running_mean is None
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        x = F.batch_norm(x, self.running_mean if not use_batch or self.track_running_stats
                         else None, self.running_var if not use_batch or self.track_running_stats
                         else None, self.weight, self.bias, use_batch, self.momentum or 0.0,
                         self.eps)
        return self.act(self.drop(x))


class DoubledLinear(nn.Linear):
    """A subclass computing something else than its parent: must be refused."""

    def forward(self, x: Tensor) -> Tensor:
        return 2 * super().forward(x)


class CheckedLinear(nn.Linear):
    """A subclass with its own forward computing the parent's formula: verified and used."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


def randomize_norm(m: nn.Module, seed: int = 0) -> None:
    """A non-trivial affine pair and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.weight.copy_(torch.rand(m.weight.shape, generator=g, dtype=m.weight.dtype) + 0.5)
        if getattr(m, "bias", None) is not None:
            m.bias.copy_(torch.rand(m.bias.shape, generator=g, dtype=m.bias.dtype) - 0.5)
        if getattr(m, "running_mean", None) is not None:
            m.running_mean.uniform_(-0.3, 0.3, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)


# ---------------------------------------------------------------- the case table
@dataclass(frozen=True)
class Case:
    """A net whose layer ``layer`` gets an exact K-FAC block on the inputs ``x``.

    ``mask(P)``: the entries of the layer's dense Fisher block (parameters in their own order)
    that the K-FAC block represents (cross-group or cross-channel entries are left out).
    """

    name: str
    build: Callable[[], tuple[nn.Module, nn.Module]]
    x: Callable[[], Tensor]
    mask: Callable[[nn.Module], Tensor]
    kind: str
    rtol: float = 1e-10
    needs: str | None = None  # an optional package the case imports (skipped without it)

    def skip_without_needs(self) -> None:
        if self.needs is not None:
            import pytest

            pytest.importorskip(self.needs)


def _full(layer: nn.Module) -> Tensor:
    P = sum(p.numel() for p in layer.parameters())
    return torch.ones(P, P, dtype=torch.bool)


def _groups_mask(layer: nn.Conv2d) -> Tensor:
    """Same group on both sides: weight entries by output channel, then the bias."""
    per = layer.out_channels // layer.groups
    w_group = torch.arange(layer.out_channels).repeat_interleave(layer.weight[0].numel()) // per
    ids = [w_group] + ([torch.arange(layer.out_channels) // per] if layer.bias is not None
                       else [])
    g = torch.cat(ids)
    return g[:, None] == g[None, :]


def _channel_mask(layer: nn.Module) -> Tensor:
    """Same channel on both sides, parameters ``[γ; β]`` (or ``[γ]``)."""
    C = layer.weight.numel()
    c = torch.arange(C).repeat(len(list(layer.parameters())))
    return c[:, None] == c[None, :]


def _conv1d_net():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(10)
    layer = Conv1D(6, 5)
    nn.init.normal_(layer.bias, std=0.3)
    return nn.Sequential(layer, nn.Tanh(), nn.Linear(6, 3)).double(), layer


def _conv_net(groups: int, c_in: int, c_out: int, bias: bool = True):
    def build():
        torch.manual_seed(11 + groups)
        layer = nn.Conv2d(c_in, c_out, 3, groups=groups, bias=bias)
        model = nn.Sequential(layer, nn.Flatten(), nn.Tanh(), nn.Linear(c_out, 3)).double()
        return model, layer
    return build


def _norm_net(make: Callable[[], nn.Module]):
    def build():
        torch.manual_seed(12)
        layer = make()
        randomize_norm(layer)
        model = nn.Sequential(nn.Linear(5, 6), layer, nn.Tanh(), nn.Linear(6, 3)).double()
        return model, layer
    return build


def _llama_rmsnorm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return LlamaRMSNorm(6, eps=1e-5)


def _spatial_norm_net(make: Callable[[], nn.Module]):
    def build():
        torch.manual_seed(13)
        layer = make()
        randomize_norm(layer)
        model = nn.Sequential(nn.Conv2d(2, 4, 1), layer, nn.Tanh(), nn.AdaptiveAvgPool2d(1),
                              nn.Flatten(), nn.Linear(4, 3)).double()
        return model, layer
    return build


def _x(*shape: int, seed: int = 14) -> Callable[[], Tensor]:
    return lambda: torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=f64)


CASES = [
    Case("transformers_conv1d", _conv1d_net, _x(1, 5), _full, "linear_transposed",
         needs="transformers"),
    Case("grouped_conv2d", _conv_net(2, 4, 6), _x(1, 4, 3, 3), _groups_mask, "conv2d_grouped"),
    Case("depthwise_conv2d", _conv_net(3, 3, 6), _x(1, 3, 3, 3), _groups_mask,
         "conv2d_grouped"),
    Case("depthwise_conv2d_no_bias", _conv_net(4, 4, 4, bias=False), _x(1, 4, 3, 3),
         _groups_mask, "conv2d_grouped"),
    Case("rmsnorm", _norm_net(lambda: nn.RMSNorm(6, eps=1e-5)), _x(7, 5), _channel_mask,
         "norm"),
    Case("layernorm_scale_only", _norm_net(lambda: nn.LayerNorm(6, bias=False)), _x(7, 5),
         _channel_mask, "norm"),
    # LlamaRMSNorm normalises in float32 whatever the input dtype: float32 rounding
    Case("llama_rmsnorm", _norm_net(_llama_rmsnorm), _x(7, 5), _channel_mask, "norm",
         rtol=1e-5, needs="transformers"),
    Case("layernorm2d_w_ne_c", _spatial_norm_net(lambda: LayerNorm2d(4)), _x(3, 2, 2, 5),
         _channel_mask, "norm"),
    Case("layernorm2d_w_eq_c", _spatial_norm_net(lambda: LayerNorm2d(4)), _x(3, 2, 3, 4),
         _channel_mask, "norm"),
    Case("batchnorm_act2d_eval", _spatial_norm_net(lambda: BatchNormAct2d(4)), _x(3, 2, 3, 4),
         _channel_mask, "norm"),
]


# ---------------------------------------------------------------- a MobileNet-style net
class SqueezeExcite(nn.Module):
    """x · σ(W₂ act(W₁ avgpool(x))) with 1×1 convolutions (MobileNetV3 / EfficientNet)."""

    def __init__(self, c: int, r: int = 4) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(c, max(1, c // r), 1)
        self.act = nn.ReLU(inplace=True)
        self.expand = nn.Conv2d(max(1, c // r), c, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = self.expand(self.act(self.reduce(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


class DepthwiseSeparable(nn.Module):
    """depthwise 3×3 → BN+act → SE → pointwise 1×1 → BN (+ in-place residual)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn1 = BatchNormAct2d(c)
        self.se = SqueezeExcite(c)
        self.pw = nn.Conv2d(c, c, 1, bias=False)
        self.bn2 = BatchNormAct2d(c, act=nn.Identity)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn2(self.pw(self.se(self.bn1(self.dw(x)))))
        y += x
        return y


class InvertedResidual(nn.Module):
    """1×1 expand → BN+act → depthwise 3×3 → BN+act → SE → 1×1 project → BN, residual."""

    def __init__(self, c: int, expand: int = 3) -> None:
        super().__init__()
        h = c * expand
        self.conv_pw = nn.Conv2d(c, h, 1, bias=False)
        self.bn1 = BatchNormAct2d(h, act=nn.Hardswish)
        self.conv_dw = nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False)
        self.bn2 = BatchNormAct2d(h, act=nn.Hardswish)
        self.se = SqueezeExcite(h)
        self.conv_pwl = nn.Conv2d(h, c, 1, bias=False)
        self.bn3 = BatchNormAct2d(c, act=nn.Identity)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))
        return x + self.bn3(self.conv_pwl(self.se(y)))


def mobilenet_like(classes: int = 5, c: int = 8) -> nn.Module:
    """A tiny MobileNet-style classifier of 3-channel images (any size ≥ 4)."""
    return nn.Sequential(
        nn.Conv2d(3, c, 3, stride=2, padding=1, bias=False), BatchNormAct2d(c),
        DepthwiseSeparable(c), InvertedResidual(c), InvertedResidual(c),
        nn.Conv2d(c, 4 * c, 1, bias=False), BatchNormAct2d(4 * c, act=nn.Hardswish),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * c, classes),
    )


def tiny_gpt2() -> nn.Module:
    """transformers' GPT-2 at the size of issue 24 (tied ``wte`` / ``lm_head``)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()  # the tiny vocabulary's bos/eos warnings
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50,
                                      n_positions=16))
