"""The networks the experiments use, built only from ``nn.Linear`` / ``nn.Conv2d``, activations
and pooling, so that every weight layer is one K-FAC can precondition."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Sequential):
    """Flatten → ``[Linear → ReLU] * len(hidden)`` → Linear.

    Input ``(m, *)`` with ``in_features`` values per sample; output logits ``(m, num_classes)``.
    """

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int) -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


class SmallCNN(nn.Sequential):
    """Two conv blocks and two linear layers.

    ``Conv 5x5 (32, pad 2) → ReLU → MaxPool 2`` → ``Conv 3x3 (64, pad 1) → ReLU → MaxPool 2`` →
    Flatten → ``Linear(64·(s/4)², 128) → ReLU → Linear(128, num_classes)``.
    Input ``(m, in_channels, s, s)``; output logits ``(m, num_classes)``.
    """

    def __init__(
        self, in_channels: int, num_classes: int, image_size: int, width: int = 128
    ) -> None:
        side = image_size // 4
        super().__init__(
            nn.Conv2d(in_channels, 32, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * side * side, width),
            nn.ReLU(),
            nn.Linear(width, num_classes),
        )


class DeepAutoencoder(nn.Module):
    """The deep autoencoder of Hinton & Salakhutdinov (2006): ``784-1000-500-250-30`` and mirror.

    ReLU between layers, a linear 30-unit code, and a linear output layer: the output is the
    logits of per-pixel Bernoulli means (train with the ``"bce"`` loss kind).
    Input ``(m, *)`` with ``in_features`` values per sample; output logits ``(m, in_features)``.
    """

    def __init__(
        self, in_features: int = 784, widths: Sequence[int] = (1000, 500, 250, 30)
    ) -> None:
        super().__init__()
        dims = [in_features, *widths]
        self.encoder = self._stack(dims)
        self.decoder = self._stack(dims[::-1])

    @staticmethod
    def _stack(dims: Sequence[int]) -> nn.Sequential:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(m, *)`` → logits ``(m, in_features)``."""
        return self.decoder(self.encoder(x.flatten(1)))
