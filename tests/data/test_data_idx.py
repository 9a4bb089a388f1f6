"""IDX reader/writer and the MNIST / Fashion-MNIST file loaders, on small generated files."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from natgrad.data import DataError, load_dataset
from natgrad.data.idx import read_idx, write_idx
from natgrad.data.mnist import FILES


def make_mnist_dir(root: Path, n_train: int = 12, n_test: int = 5, gz: bool = False) -> Path:
    """Write the four MNIST IDX files with random content into ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    sizes = {"train": n_train, "test": n_test}
    for key, name in FILES.items():
        split, kind = key.split("_")
        n = sizes[split]
        data = rng.integers(0, 256, (n, 28, 28)) if kind == "images" else rng.integers(0, 10, n)
        write_idx(root / f"{name}{suffix}", data.astype(np.uint8))
    return root


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("shape", [(7,), (3, 4, 5), (0, 2)])
def test_idx_round_trip(tmp_path, suffix, shape):
    data = np.random.default_rng(1).integers(0, 256, shape).astype(np.uint8)
    path = write_idx(tmp_path / f"x{suffix}", data)
    out = read_idx(path)
    assert out.dtype == np.uint8 and out.shape == shape
    np.testing.assert_array_equal(out, data)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_loader_raw_and_gz(tmp_path, gz):
    make_mnist_dir(tmp_path, gz=gz)
    train, test = load_dataset("mnist", root=tmp_path)
    assert train.x.shape == (12, 1, 28, 28) and test.x.shape == (5, 1, 28, 28)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert 0.0 <= train.x.min() and train.x.max() <= 1.0
    raw = read_idx(tmp_path / (FILES["train_images"] + (".gz" if gz else "")))
    torch.testing.assert_close(train.x[:, 0], torch.from_numpy(raw).float() / 255)


def test_fashion_mnist_torchvision_layout(tmp_path):
    make_mnist_dir(tmp_path / "FashionMNIST" / "raw")
    train, test = load_dataset("fashion-mnist", root=tmp_path, normalize=True)
    assert train.info.name == "fashion-mnist" and len(train) == 12 and len(test) == 5
    assert train.x.min() < 0  # standardised


def test_bad_magic_names_file(tmp_path):
    make_mnist_dir(tmp_path)
    bad = tmp_path / FILES["train_labels"]
    bad.write_bytes(b"\x12\x34\x08\x01" + bad.read_bytes()[4:])
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.*magic"):
        load_dataset("mnist", root=tmp_path)


def test_truncated_file_names_file(tmp_path):
    make_mnist_dir(tmp_path)
    path = tmp_path / FILES["test_images"]
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.*expected 3920 for shape"):
        load_dataset("mnist", root=tmp_path)


def test_truncated_header(tmp_path):
    path = tmp_path / "h"
    path.write_bytes(b"\x00\x00\x08\x03\x00\x00")
    with pytest.raises(DataError, match="truncated IDX header"):
        read_idx(path)


def test_wrong_dimensions(tmp_path):
    path = write_idx(tmp_path / "labels", np.zeros((3, 2), np.uint8))
    with pytest.raises(DataError, match="2 dimensions, expected 1"):
        read_idx(path, expected_ndim=1)


def test_corrupt_gzip_names_file(tmp_path):
    make_mnist_dir(tmp_path, gz=True)
    path = tmp_path / (FILES["train_images"] + ".gz")
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz.*gzip"):
        load_dataset("mnist", root=tmp_path)
    # a gzip stream cut short is reported too
    path.write_bytes(gzip.compress(b"\x00" * 5000)[:50])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz"):
        load_dataset("mnist", root=tmp_path)


def test_missing_file_names_file(tmp_path):
    make_mnist_dir(tmp_path)
    (tmp_path / FILES["test_labels"]).unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte: file not found"):
        load_dataset("mnist", root=tmp_path)


def test_label_count_mismatch(tmp_path):
    make_mnist_dir(tmp_path)
    write_idx(tmp_path / FILES["train_labels"], np.zeros(11, np.uint8))
    with pytest.raises(DataError, match="11 labels, expected 12"):
        load_dataset("mnist", root=tmp_path)


def test_data_error_is_value_error():
    assert issubclass(DataError, ValueError)
