"""MNIST and Fashion-MNIST from IDX files in a user-given directory.

Expected files (raw or ``.gz``), either directly in the directory or in torchvision's layout
``<root>/MNIST/raw`` / ``<root>/FashionMNIST/raw``::

    train-images-idx3-ubyte  train-labels-idx1-ubyte  t10k-images-idx3-ubyte  t10k-labels-idx1-ubyte
"""

from __future__ import annotations

from pathlib import Path

from .base import ArrayDataset, images_to_tensor, labels_to_tensor
from .errors import DataError
from .idx import read_idx
from .info import IDX_FILES as FILES
from .info import DatasetInfo

MNIST_STATS = ((0.1307,), (0.3081,))
FASHION_STATS = ((0.2860,), (0.3530,))
# torchvision's sub-directories, searched after the root itself.
SUBDIRS = {"mnist": ("MNIST/raw",), "fashion-mnist": ("FashionMNIST/raw",)}


def find_file(root: Path, name: str, subdirs: tuple[str, ...] = ()) -> Path:
    """First of ``root/name``, ``root/name.gz``, ``root/sub/name``, ``root/sub/name.gz``."""
    for folder in (root, *(root / s for s in subdirs)):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise DataError(f"{root / name}: file not found (also tried .gz and {', '.join(subdirs)})")


def _split(images_path: Path, labels_path: Path, info: DatasetInfo, stats) -> ArrayDataset:
    images = read_idx(images_path, expected_ndim=3)
    labels = read_idx(labels_path, expected_ndim=1)
    if images.shape[1:] != (28, 28):
        raise DataError(f"{images_path}: images are {images.shape[1:]}, expected (28, 28)")
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{labels_path}: {labels.shape[0]} labels, expected {images.shape[0]} to match "
            f"{images_path.name}"
        )
    if labels.size and labels.max() >= info.num_classes:
        raise DataError(f"{labels_path}: label {labels.max()} out of range 0..9")
    mean, std = stats if stats is not None else (None, None)
    x = images_to_tensor(images, mean=mean, std=std)
    return ArrayDataset(x, labels_to_tensor(labels), info)


def load_idx_dataset(
    root: str | Path, info: DatasetInfo, normalize: bool = False
) -> tuple[ArrayDataset, ArrayDataset]:
    """``(train, test)`` of an MNIST-style data set: x float32 ``(N, 1, 28, 28)``, y int64."""
    root = Path(root)
    subdirs = SUBDIRS.get(info.name, ())
    paths = {key: find_file(root, name, subdirs) for key, name in FILES.items()}
    stats = (MNIST_STATS if info.name == "mnist" else FASHION_STATS) if normalize else None
    train = _split(paths["train_images"], paths["train_labels"], info, stats)
    test = _split(paths["test_images"], paths["test_labels"], info, stats)
    return train, test
