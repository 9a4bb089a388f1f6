"""Data sets: the embedded MNIST sample, MNIST / Fashion-MNIST / CIFAR-10 files, a synthetic task.

>>> train, test = load_dataset("mnist5k")
>>> train.x.shape, train.y.shape, train.info.num_classes
(torch.Size([4000, 1, 28, 28]), torch.Size([4000]), 10)
"""

from .base import ArrayDataset, DatasetInfo
from .errors import DataError
from .registry import DATASETS, DatasetSpec, dataset_info, load_dataset

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "DataError",
    "DatasetInfo",
    "DatasetSpec",
    "dataset_info",
    "load_dataset",
]
