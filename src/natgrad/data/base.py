"""Shared types: :class:`DatasetInfo` and the tensor-backed :class:`ArrayDataset`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import TensorDataset


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a data set.

    Attributes:
        name: registry name, e.g. ``"mnist5k"``.
        input_shape: shape of one input, ``(C, H, W)`` for images, ``(D,)`` for vectors or
            ``(T,)`` for token sequences.
        num_classes: number of labels (per position for sequences).
        vocab: the number of token values for token-sequence inputs (int64 ids, one label
            per position); 0 for real-valued inputs.
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    vocab: int = 0

    @property
    def is_sequence(self) -> bool:
        """True for token-sequence inputs ``(T,)`` of int64 ids with a label per position."""
        return self.vocab > 0

    @property
    def is_image(self) -> bool:
        """True for ``(C, H, W)`` inputs."""
        return len(self.input_shape) == 3 and not self.is_sequence

    @property
    def in_features(self) -> int:
        """Number of input values per sample (``C·H·W`` for images)."""
        return math.prod(self.input_shape)

    @property
    def in_channels(self) -> int:
        """Channels ``C`` of an image input (1 for a vector input)."""
        return self.input_shape[0] if self.is_image else 1

    @property
    def image_size(self) -> int:
        """Height ``H`` (= width) of a square image input."""
        if not self.is_image:
            raise ValueError(f"data set {self.name!r} has no images (input {self.input_shape})")
        return self.input_shape[1]


class ArrayDataset(TensorDataset):
    """A :class:`~torch.utils.data.TensorDataset` of ``(x, y)`` plus its :class:`DatasetInfo`.

    ``x`` is float32 ``(N, *info.input_shape)``, ``y`` int64 ``(N,)`` — or, for token
    sequences, ``x`` and ``y`` int64 ``(N, T)``.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, info: DatasetInfo) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
        super().__init__(x, y)
        self.info = info

    @property
    def x(self) -> torch.Tensor:
        """Inputs, float32 ``(N, *input_shape)``."""
        return self.tensors[0]

    @property
    def y(self) -> torch.Tensor:
        """Labels, int64 ``(N,)``."""
        return self.tensors[1]

    def subset(self, n: int) -> ArrayDataset:
        """The first ``n`` samples (a view, no copy)."""
        return ArrayDataset(self.x[:n], self.y[:n], self.info)


def images_to_tensor(
    images: np.ndarray,
    channels_last: bool = False,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> torch.Tensor:
    """uint8 images → float32 ``(N, C, H, W)`` in ``[0, 1]``, optionally ``(x - mean) / std``.

    Args:
        images: uint8 ``(N, H, W)`` (one channel), ``(N, C, H, W)`` or, with ``channels_last``,
            ``(N, H, W, C)``.
        channels_last: whether the channel axis is last.
        mean, std: per-channel normalisation constants (applied when both are given).
    """
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.ndim == 3:
        x = x.unsqueeze(1)
    elif channels_last:
        x = x.permute(0, 3, 1, 2)
    x = x.to(torch.float32).div_(255.0).contiguous()
    if mean is not None and std is not None:
        m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        x = (x - m) / s
    return x


def labels_to_tensor(labels: np.ndarray) -> torch.Tensor:
    """Labels → int64 ``(N,)``."""
    return torch.from_numpy(np.asarray(labels).astype(np.int64))
