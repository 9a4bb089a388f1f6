"""Data sets: the embedded MNIST sample, MNIST / Fashion-MNIST / CIFAR-10 files, a synthetic task.

>>> train, test = load_dataset("mnist5k")
>>> train.x.shape, train.y.shape, train.info.num_classes
(torch.Size([4000, 1, 28, 28]), torch.Size([4000]), 10)

The registry (:data:`DATASETS`, :class:`DatasetInfo`, :class:`DataError`) imports no torch;
:class:`ArrayDataset` (and torch with it) is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import DataError
from .info import DatasetInfo
from .registry import DATASETS, DatasetSpec, dataset_info, load_dataset

if TYPE_CHECKING:  # pragma: no cover - imported lazily by __getattr__
    from .base import ArrayDataset

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "DataError",
    "DatasetInfo",
    "DatasetSpec",
    "dataset_info",
    "load_dataset",
]


def __getattr__(name: str) -> Any:
    if name == "ArrayDataset":
        from .base import ArrayDataset

        return ArrayDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
