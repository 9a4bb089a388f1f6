"""Synthetic teacher–student classification: a random MLP teacher labels Gaussian inputs.

Small, fast and fully determined by its seed; meant for tests and quick checks.
"""

from __future__ import annotations

import torch

from .base import ArrayDataset
from .info import TEACHER_INFO, DatasetInfo

(DIM,), NUM_CLASSES = TEACHER_INFO.input_shape, TEACHER_INFO.num_classes


def load_teacher(
    n_train: int = 2000,
    n_test: int = 500,
    dim: int = DIM,
    num_classes: int = NUM_CLASSES,
    hidden: int = 32,
    seed: int = 0,
) -> tuple[ArrayDataset, ArrayDataset]:
    """``(train, test)`` with x float32 ``(N, dim)`` ~ N(0, I) and y = argmax of a random teacher.

    The teacher is ``Linear(dim, hidden) → tanh → Linear(hidden, num_classes)`` with Gaussian
    weights scaled by ``1/sqrt(fan_in)``; labels are the arg-max of its logits (noise-free).
    """
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(hidden, dim, generator=g) * 2.0 / dim**0.5
    w2 = torch.randn(num_classes, hidden, generator=g) / hidden**0.5
    x = torch.randn(n_train + n_test, dim, generator=g)
    y = (torch.tanh(x @ w1.T) @ w2.T).argmax(dim=1)
    info = DatasetInfo("teacher", (dim,), num_classes)
    train = ArrayDataset(x[:n_train], y[:n_train], info)
    return train, ArrayDataset(x[n_train:], y[n_train:], info)
