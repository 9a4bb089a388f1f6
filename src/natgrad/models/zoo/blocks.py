"""The building blocks of timm's networks, written for natgrad's zoo (no timm import).

Each class reproduces a pattern a user's network brings, as timm writes it, so that natgrad is
tested on what it will meet rather than on networks built for it:

* :class:`LayerNorm2d` — an ``nn.LayerNorm`` *subclass* that normalises dim 1 of ``(B, C, H, W)``
  (it permutes to channels-last and back), so its parent's formula is not what it computes;
* :class:`BatchNormAct2d` — a ``BatchNorm2d`` subclass whose forward is ``act(BN(x))``;
* :class:`SqueezeExcite` — ``x · gate(W₂ act(W₁ mean_hw(x)))`` with 1×1 convolutions;
* :class:`DepthwiseSeparable` and :class:`InvertedResidual` — MobileNet/EfficientNet blocks
  (depthwise ``groups = C`` convolutions, squeeze-excitation, a residual when shapes allow);
* :class:`ConvNeXtBlock` — depthwise 7×7 conv, channels-last ``nn.LayerNorm``, an MLP of
  ``nn.Linear`` and a layer-scale parameter ``gamma`` outside any layer;
* :class:`Attention` / :class:`ViTBlock` — pre-norm attention through
  ``F.scaled_dot_product_attention`` (no forward-mode AD) and a GELU MLP;
* :class:`BasicBlockInplace` — a ResNet basic block with ``ReLU(inplace=True)`` and
  ``x += shortcut``.

Shapes are ``(B, C, H, W)`` for images and ``(B, T, D)`` for tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of ``(B, C, H, W)`` (timm's ``LayerNorm2d``): normalised
    shape ``(C,)``, applied at every pixel."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class BatchNormAct2d(nn.BatchNorm2d):
    """``act(BatchNorm2d(x))`` in one module (timm's ``BatchNormAct2d``); ``act=None``: the
    identity (timm's ``apply_act=False``). ``drop`` is an identity, as timm's default."""

    def __init__(self, num_features: int, act: type[nn.Module] | None = nn.ReLU,
                 inplace: bool = True, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.drop = nn.Identity()
        if act is None:
            self.act: nn.Module = nn.Identity()
        elif act in (nn.ReLU, nn.Hardswish, nn.SiLU):
            self.act = act(inplace=inplace)
        else:
            self.act = act()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))


class SqueezeExcite(nn.Module):
    """Channel gating ``x · hardsigmoid(conv₂(relu(conv₁(mean_hw(x)))))``; 1×1 convs with bias,
    ``reduced`` channels in between."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1)
        self.act = nn.ReLU(inplace=True)
        self.conv_expand = nn.Conv2d(reduced, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.conv_expand(self.act(self.conv_reduce(s))))


class DepthwiseSeparable(nn.Module):
    """Depthwise 3×3 conv + BN-ReLU, squeeze-excitation, pointwise conv + BN (no activation);
    the input is added back when the shape is kept."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, se_reduced: int = 4) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False)
        self.bn1 = BatchNormAct2d(c_in, nn.ReLU)
        self.se = SqueezeExcite(c_in, se_reduced)
        self.conv_pw = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn2 = BatchNormAct2d(c_out, None)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv_pw(self.se(self.bn1(self.conv_dw(x)))))
        return out + x if self.residual else out


class InvertedResidual(nn.Module):
    """MobileNetV3 block: pointwise expansion + BN-hardswish, depthwise 3×3 + BN-hardswish,
    squeeze-excitation, pointwise projection + BN; residual when the shape is kept."""

    def __init__(self, c_in: int, c_out: int, expand: int = 2, stride: int = 1,
                 se_reduced: int = 4) -> None:
        super().__init__()
        mid = c_in * expand
        self.conv_pw = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn1 = BatchNormAct2d(mid, nn.Hardswish)
        self.conv_dw = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = BatchNormAct2d(mid, nn.Hardswish)
        self.se = SqueezeExcite(mid, se_reduced)
        self.conv_pwl = nn.Conv2d(mid, c_out, 1, bias=False)
        self.bn3 = BatchNormAct2d(c_out, None)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))
        out = self.bn3(self.conv_pwl(self.se(out)))
        return out + x if self.residual else out


class ConvNeXtBlock(nn.Module):
    """``x + gamma · MLP(LN(dwconv7x7(x)))`` with the LayerNorm and the MLP channels-last
    (``(B, H, W, C)``), as ConvNeXt writes it; ``gamma`` is a bare ``(C,)`` parameter."""

    def __init__(self, dim: int, mlp_ratio: int = 4, layer_scale: float = 1e-1) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_dw(x).permute(0, 2, 3, 1)
        h = self.fc2(self.act(self.fc1(self.norm(h))))
        return x + (self.gamma * h).permute(0, 3, 1, 2)


class Attention(nn.Module):
    """Multi-head self-attention: one ``qkv`` Linear, ``F.scaled_dot_product_attention``, an
    output projection. ``(B, T, D) → (B, T, D)``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be a multiple of heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, T, D/heads)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class ViTBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(),
                                 nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class BasicBlockInplace(nn.Module):
    """ResNet basic block as timm writes it: conv-BN-ReLU(inplace)-conv-BN, then
    ``x += shortcut`` and an in-place ReLU (1×1 conv + BN shortcut when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                            nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        x += shortcut
        return self.act2(x)
