"""CIFAR-10 from the "python version" pickle batches.

Expected layout: ``<root>/cifar-10-batches-py/{data_batch_1..data_batch_5, test_batch}`` (as
extracted from ``cifar-10-python.tar.gz`` or by torchvision), or the batch files directly in
``<root>``. Each batch is a pickled dict with ``b"data"`` (uint8 ``(n, 3072)``, channel-major
32x32 images) and ``b"labels"`` (``n`` ints). Pickle files can execute code when loaded: only
point this loader at files you trust.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from .base import ArrayDataset, images_to_tensor, labels_to_tensor
from .errors import DataError
from .info import CIFAR10_INFO as INFO
from .info import CIFAR_SUBDIR as SUBDIR
from .info import CIFAR_TEST_BATCHES as TEST_BATCHES
from .info import CIFAR_TRAIN_BATCHES as TRAIN_BATCHES

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def batch_dir(root: Path) -> Path:
    """The folder holding the batch files: ``root/cifar-10-batches-py`` or ``root`` itself."""
    sub = root / SUBDIR
    return sub if sub.is_dir() else root


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickle batch → uint8 images ``(n, 3, 32, 32)`` and uint8 labels ``(n,)``."""
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected a CIFAR-10 python pickle batch)")
    try:
        with path.open("rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
    except Exception as exc:  # UnpicklingError, EOFError, ... of a damaged file
        raise DataError(f"{path}: not a readable CIFAR-10 pickle batch ({exc})") from exc
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{path}: expected a dict with keys b'data' and b'labels'")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: data has shape {data.shape}, expected (n, 3072)")
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {labels.size} labels, expected {data.shape[0]}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels must be in 0..9")
    return data.astype(np.uint8).reshape(-1, 3, 32, 32), labels.astype(np.uint8)


def _load(folder: Path, names: tuple[str, ...], normalize: bool) -> ArrayDataset:
    parts = [read_batch(folder / n) for n in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    mean, std = (MEAN, STD) if normalize else (None, None)
    x = images_to_tensor(images, mean=mean, std=std)
    return ArrayDataset(x, labels_to_tensor(labels), INFO)


def load_cifar10(
    root: str | Path, normalize: bool = False
) -> tuple[ArrayDataset, ArrayDataset]:
    """``(train, test)``: x float32 ``(N, 3, 32, 32)`` in ``[0, 1]``, y int64 ``(N,)``."""
    folder = batch_dir(Path(root))
    return _load(folder, TRAIN_BATCHES, normalize), _load(folder, TEST_BATCHES, normalize)
