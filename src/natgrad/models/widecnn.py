"""A plain wide convolutional network, the CNN of ``natgrad bench capacity``.

``len(channels)`` blocks ``Conv 3x3 (c_i, pad 1) → ReLU``, each but the last followed by
``MaxPool 2``, then global average pooling and ``Linear(c_last, num_classes)``. With the default
channels ``(128, 256, 512)`` on MNIST it has 1.5M parameters and its widest Kronecker factor is
the last conv's input factor, ``256·9 + 1 = 2305`` wide; the pooling keeps the classifier small
so that the width lives in the conv layers.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


class WideCNN(nn.Sequential):
    """Input ``(m, in_channels, s, s)``; output logits ``(m, num_classes)``."""

    def __init__(self, in_channels: int, num_classes: int,
                 channels: Sequence[int] = (128, 256, 512)) -> None:
        if not channels:
            raise ValueError("channels must not be empty")
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU()]
            if i < len(channels) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
        super().__init__(*layers)
