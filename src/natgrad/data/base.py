"""The tensor-backed :class:`ArrayDataset` and the array-to-tensor helpers of the loaders.

:class:`DatasetInfo` lives in the torch-free :mod:`natgrad.data.info` and is re-exported here.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .info import DatasetInfo

__all__ = ["ArrayDataset", "DatasetInfo", "images_to_tensor", "labels_to_tensor"]


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
