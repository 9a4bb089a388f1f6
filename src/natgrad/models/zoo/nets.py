"""Tiny assembled networks from the blocks of :mod:`natgrad.models.zoo.blocks`.

Each takes images ``(B, C, H, W)`` and returns logits ``(B, num_classes)``; widths default to a
few channels so that dense float64 Fisher references stay cheap (a few thousand parameters at
``3×16×16``). ``H`` and ``W`` must be multiples of 8 (4 for :class:`ResNetInplace`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .blocks import (
    BasicBlockInplace,
    BatchNormAct2d,
    ConvNeXtBlock,
    DepthwiseSeparable,
    InvertedResidual,
    LayerNorm2d,
    ViTBlock,
)


class MobileNetLike(nn.Module):
    """Stem conv (stride 2) + BN-hardswish, a depthwise-separable block, two inverted-residual
    blocks with squeeze-excitation (the second residual), a 1×1 conv + BN-hardswish head, global
    average pooling and a linear classifier."""

    def __init__(self, in_channels: int = 3, num_classes: int = 5, width: int = 8) -> None:
        super().__init__()
        w, w2 = width, width + width // 2
        self.conv_stem = nn.Conv2d(in_channels, w, 3, 2, 1, bias=False)
        self.bn1 = BatchNormAct2d(w, nn.Hardswish)
        self.blocks = nn.Sequential(
            DepthwiseSeparable(w, w, se_reduced=4),
            InvertedResidual(w, w2, expand=2, stride=2, se_reduced=4),
            InvertedResidual(w2, w2, expand=2, stride=1, se_reduced=4),
        )
        self.conv_head = nn.Conv2d(w2, 2 * w2, 1, bias=False)
        self.bn2 = BatchNormAct2d(2 * w2, nn.Hardswish)
        self.classifier = nn.Linear(2 * w2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn2(self.conv_head(self.blocks(self.bn1(self.conv_stem(x)))))
        return self.classifier(h.mean((2, 3)))


class ConvNeXtLike(nn.Module):
    """Patchify stem (4×4 conv, stride 4) + channels-first LayerNorm, a ConvNeXt block,
    downsampling (channels-first LayerNorm + 2×2 conv, stride 2), a ConvNeXt block, global
    average pooling, LayerNorm and a linear head."""

    def __init__(self, in_channels: int = 3, num_classes: int = 5,
                 dims: tuple[int, int] = (8, 12)) -> None:
        super().__init__()
        d1, d2 = dims
        self.stem = nn.Sequential(nn.Conv2d(in_channels, d1, 4, stride=4), LayerNorm2d(d1))
        self.stage1 = ConvNeXtBlock(d1)
        self.downsample = nn.Sequential(LayerNorm2d(d1), nn.Conv2d(d1, d2, 2, stride=2))
        self.stage2 = ConvNeXtBlock(d2)
        self.norm = nn.LayerNorm(d2)
        self.head = nn.Linear(d2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stage2(self.downsample(self.stage1(self.stem(x))))
        return self.head(self.norm(h.mean((2, 3))))


class ViTLike(nn.Module):
    """Patch embedding (conv, stride = patch), a class token and learned position embeddings
    (bare parameters), ``depth`` pre-norm blocks, a final LayerNorm and a linear head on the
    class token."""

    def __init__(self, in_channels: int = 3, num_classes: int = 5, image_size: int = 16,
                 patch: int = 4, dim: int = 8, depth: int = 2, heads: int = 2) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size={image_size} must be a multiple of patch={patch}")
        tokens = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*(ViTBlock(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, tokens, dim)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(h))[:, 0])


class ResNetInplace(nn.Module):
    """Stem conv + BN + in-place ReLU, two basic blocks with in-place residuals (the second
    downsampling, with a 1×1 conv shortcut), global average pooling and a linear head."""

    def __init__(self, in_channels: int = 3, num_classes: int = 5, width: int = 6) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)
        self.layer1 = BasicBlockInplace(width, width)
        self.layer2 = BasicBlockInplace(width, 2 * width, stride=2)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.layer2(self.layer1(self.act1(self.bn1(self.conv1(x)))))
        return self.fc(h.mean((2, 3)))
