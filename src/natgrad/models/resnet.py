"""A small residual network with BatchNorm (ResNet-8 style) for the image data sets.

``conv3x3(w) → BN → ReLU`` then three stages of one basic block each (``w, 2w, 4w`` channels, the
last two downsampling by 2, a 1×1 conv + BN shortcut where the shape changes), global average
pooling and a linear classifier. With ``w = 16`` it has 78k parameters on MNIST (16–64 channels).
Every weight is a Conv2d (no bias: BatchNorm follows), a BatchNorm or the final Linear, so
natgrad preconditions all of them.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """``x + f(x)`` with ``f = conv-BN-ReLU-conv-BN`` (projection shortcut when needed)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet8(nn.Module):
    """Input ``(m, C, H, W)``; output logits ``(m, num_classes)``."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.stages = nn.Sequential(BasicBlock(width, width, 1),
                                    BasicBlock(width, 2 * width, 2),
                                    BasicBlock(2 * width, 4 * width, 2))
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.stem(x))
        return self.head(h.mean(dim=(2, 3)))
