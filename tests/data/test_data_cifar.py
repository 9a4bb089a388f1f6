"""CIFAR-10 pickle-batch loader, on small generated batches."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from natgrad.data import DataError, load_dataset
from natgrad.data.cifar import SUBDIR, TEST_BATCHES, TRAIN_BATCHES


def make_cifar_dir(root: Path, n: int = 4) -> Path:
    """Write ``data_batch_1..5`` and ``test_batch`` with ``n`` random images each."""
    folder = root / SUBDIR
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in TRAIN_BATCHES + TEST_BATCHES:
        batch = {
            b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
            b"labels": rng.integers(0, 10, n).tolist(),
        }
        with (folder / name).open("wb") as fh:
            pickle.dump(batch, fh)
    return folder


def test_cifar_loader(tmp_path):
    folder = make_cifar_dir(tmp_path)
    train, test = load_dataset("cifar10", root=tmp_path)
    assert train.x.shape == (20, 3, 32, 32) and test.x.shape == (4, 3, 32, 32)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert 0.0 <= train.x.min() and train.x.max() <= 1.0
    with (folder / "test_batch").open("rb") as fh:
        batch = pickle.load(fh, encoding="bytes")
    expected = torch.from_numpy(batch[b"data"].reshape(-1, 3, 32, 32)).float() / 255
    torch.testing.assert_close(test.x, expected)
    assert test.y.tolist() == batch[b"labels"]


def test_cifar_batches_directly_in_root(tmp_path):
    folder = make_cifar_dir(tmp_path)
    train, _ = load_dataset("cifar10", root=folder)
    assert len(train) == 20


def test_cifar_corrupt_batch_names_file(tmp_path):
    folder = make_cifar_dir(tmp_path)
    (folder / "data_batch_3").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match="data_batch_3.*pickle"):
        load_dataset("cifar10", root=tmp_path)


def test_cifar_wrong_shape_names_file(tmp_path):
    folder = make_cifar_dir(tmp_path)
    with (folder / "test_batch").open("wb") as fh:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(DataError, match=r"test_batch: data has shape \(2, 100\), expected"):
        load_dataset("cifar10", root=tmp_path)


def test_cifar_missing_batch_names_file(tmp_path):
    folder = make_cifar_dir(tmp_path)
    (folder / "data_batch_5").unlink()
    with pytest.raises(DataError, match="data_batch_5: file not found"):
        load_dataset("cifar10", root=tmp_path)
