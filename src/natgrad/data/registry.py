"""The table of data sets: name → how to load it and what a model needs to know about it.

Adding a data set is one :data:`DATASETS` entry. The table imports neither torch nor numpy (the
command line's help lists it): each loader module is imported when its data set is loaded.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import info as _info
from .errors import DataError
from .info import DatasetInfo

if TYPE_CHECKING:  # pragma: no cover - loaders are imported on first use
    from .base import ArrayDataset

Loader = Callable[[Path | None, bool], "tuple[ArrayDataset, ArrayDataset]"]


def _load(module: str, function: str, *args: Any, **kwargs: Any) -> Any:
    """Call ``natgrad.data.<module>.<function>``, importing the module (and torch) only now."""
    return getattr(importlib.import_module(f"{__package__}.{module}"), function)(*args, **kwargs)


@dataclass(frozen=True)
class DatasetSpec:
    """One registry entry.

    Attributes:
        loader: ``loader(root, normalize) -> (train, test)``.
        info: input shape and number of classes.
        files: for file-backed data sets, the files expected under ``root`` (for messages);
            empty for built-in ones.
        torchvision_name: class in ``torchvision.datasets`` that ``download=True`` uses.
        description: one line for ``--help`` and the README.
    """

    loader: Loader
    info: DatasetInfo
    files: tuple[str, ...] = ()
    torchvision_name: str | None = None
    description: str = ""

    @property
    def needs_root(self) -> bool:
        """Whether the data live in a user-given directory."""
        return bool(self.files)


_IDX_FILES = tuple(f"{n}[.gz]" for n in _info.IDX_FILES.values())
_CIFAR_FILES = tuple(f"{_info.CIFAR_SUBDIR}/{n}"
                     for n in _info.CIFAR_TRAIN_BATCHES + _info.CIFAR_TEST_BATCHES)

DATASETS: dict[str, DatasetSpec] = {
    "mnist5k": DatasetSpec(
        lambda root, norm: _load("embedded", "load_mnist5k", normalize=norm),
        _info.MNIST5K_INFO,
        description="embedded 5,000-digit MNIST sample (4,000 train / 1,000 test)",
    ),
    "mnist": DatasetSpec(
        lambda root, norm: _load("mnist", "load_idx_dataset", root, _info.MNIST_INFO, norm),
        _info.MNIST_INFO,
        files=_IDX_FILES,
        torchvision_name="MNIST",
        description="MNIST from IDX files (60,000 / 10,000)",
    ),
    "fashion-mnist": DatasetSpec(
        lambda root, norm: _load("mnist", "load_idx_dataset", root, _info.FASHION_INFO, norm),
        _info.FASHION_INFO,
        files=_IDX_FILES,
        torchvision_name="FashionMNIST",
        description="Fashion-MNIST from IDX files (60,000 / 10,000)",
    ),
    "cifar10": DatasetSpec(
        lambda root, norm: _load("cifar", "load_cifar10", root, norm),
        _info.CIFAR10_INFO,
        files=_CIFAR_FILES,
        torchvision_name="CIFAR10",
        description="CIFAR-10 from the python pickle batches (50,000 / 10,000)",
    ),
    "teacher": DatasetSpec(
        lambda root, norm: _load("teacher", "load_teacher"),
        _info.TEACHER_INFO,
        description="synthetic teacher-student classification (20-d Gaussian inputs, 4 classes)",
    ),
    "majority": DatasetSpec(
        lambda root, norm: _load("sequences", "load_majority"),
        _info.MAJORITY_INFO,
        description="generated token sequences, target: the running majority (4,000 / 1,000)",
    ),
    "shakespeare_char": DatasetSpec(
        lambda root, norm: _load("shakespeare", "load_shakespeare_char"),
        _info.SHAKESPEARE_CHAR_INFO,
        description="embedded Shakespeare text, 64 characters per sample, target: the next "
                    "character (71,118 / 3,950; a validation split too)",
    ),
}


def get_spec(name: str) -> DatasetSpec:
    """The registry entry for ``name``; ``ValueError`` listing the accepted names otherwise."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(
            f"unknown data set {name!r}; accepted: {', '.join(DATASETS)}"
        ) from None


def dataset_info(name: str) -> DatasetInfo:
    """Input shape and number of classes of a registered data set, without loading it."""
    return get_spec(name).info


def missing_files_message(name: str, root: str | Path | None) -> str:
    """One line saying which files to put where for a file-backed data set."""
    spec = get_spec(name)
    where = str(root) if root is not None else "DIR (pass root=DIR / --data-dir DIR)"
    return f"data set {name!r} needs {', '.join(spec.files)} in {where}"


def _download(name: str, spec: DatasetSpec, root: Path) -> None:
    """Fetch the files with torchvision, which is optional."""
    try:
        import torchvision.datasets as tvd
    except Exception as exc:  # torchvision may be absent or fail to import with this torch
        raise DataError(
            f"cannot download {name!r}: torchvision is not usable ({type(exc).__name__}); "
            f"{missing_files_message(name, root)}"
        ) from None
    cls = getattr(tvd, spec.torchvision_name)
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as exc:
        raise DataError(
            f"download of {name!r} failed ({exc}); {missing_files_message(name, root)}"
        ) from None


def load_dataset(
    name: str = "mnist5k",
    root: str | Path | None = None,
    download: bool = False,
    normalize: bool = False,
) -> tuple[ArrayDataset, ArrayDataset]:
    """Load a registered data set as ``(train, test)``.

    Images come as float32 ``(N, C, H, W)`` in ``[0, 1]`` (standardised per channel when
    ``normalize``), labels as int64 ``(N,)``; ``train.info`` holds the :class:`DatasetInfo`.

    Args:
        name: one of :data:`DATASETS` (``mnist5k``, ``mnist``, ``fashion-mnist``, ``cifar10``,
            ``teacher``, ``majority``, ``shakespeare_char``).
        root: directory with the files of a file-backed data set (ignored by built-in ones).
        download: fetch missing files with torchvision, when it is importable.
        normalize: standardise inputs with the data set's usual mean and std.

    Raises:
        ValueError: unknown name.
        DataError: no ``root`` for a file-backed data set, or missing / truncated / corrupt files.
    """
    spec = get_spec(name)
    path = Path(root) if root is not None else None
    if spec.needs_root:
        if path is None:
            raise DataError(missing_files_message(name, None))
        if download:
            path.mkdir(parents=True, exist_ok=True)
            _download(name, spec, path)
        elif not path.is_dir():
            raise DataError(
                f"{path}: data directory not found; {missing_files_message(name, path)}"
            )
    return spec.loader(path, normalize)
