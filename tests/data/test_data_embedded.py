"""The embedded MNIST sample, the teacher data set and the data-set registry."""

from __future__ import annotations

import pytest
import torch

from natgrad.data import DATASETS, DataError, dataset_info, load_dataset
from natgrad.data.embedded import embedded_path


@pytest.fixture(scope="module")
def mnist5k():
    return load_dataset("mnist5k")


def test_embedded_file_is_small():
    assert embedded_path().stat().st_size <= 2 * 1024 * 1024


def test_split_sizes_dtype_range(mnist5k):
    train, test = mnist5k
    assert train.x.shape == (4000, 1, 28, 28) and test.x.shape == (1000, 1, 28, 28)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert train.x.min() == 0.0 and train.x.max() == 1.0
    assert train.info == dataset_info("mnist5k")


def test_split_is_stratified_and_disjoint(mnist5k):
    train, test = mnist5k
    assert train.y.bincount(minlength=10).tolist() == [400] * 10
    assert test.y.bincount(minlength=10).tolist() == [100] * 10
    # no test image also appears in the training split
    flat_train = {bytes(row) for row in (train.x.flatten(1) * 255).round().byte().numpy()}
    flat_test = [bytes(row) for row in (test.x.flatten(1) * 255).round().byte().numpy()]
    assert sum(row in flat_train for row in flat_test) <= 2  # MNIST has a few exact duplicates


def test_split_is_shuffled(mnist5k):
    train, _ = mnist5k
    assert not torch.equal(train.y, train.y.sort().values)


def test_normalize(mnist5k):
    train_n, _ = load_dataset("mnist5k", normalize=True)
    assert abs(train_n.x.mean().item()) < 0.1
    torch.testing.assert_close(train_n.x * 0.3081 + 0.1307, mnist5k[0].x)


def test_teacher_is_seeded_and_learnable_shape():
    a_train, a_test = load_dataset("teacher")
    b_train, _ = load_dataset("teacher")
    assert torch.equal(a_train.x, b_train.x) and torch.equal(a_train.y, b_train.y)
    assert a_train.x.shape == (2000, 20) and a_test.x.shape == (500, 20)
    assert set(a_train.y.unique().tolist()) == {0, 1, 2, 3}


def test_unknown_name_lists_accepted():
    accepted = "accepted: mnist5k, mnist, fashion-mnist, cifar10, teacher"
    with pytest.raises(ValueError, match=accepted):
        load_dataset("imagenet")


@pytest.mark.parametrize("name", [n for n, s in DATASETS.items() if s.needs_root])
def test_file_dataset_without_root(name):
    with pytest.raises(DataError, match="needs"):
        load_dataset(name)


def test_missing_directory(tmp_path):
    with pytest.raises(DataError, match="data directory not found.*train-images-idx3-ubyte"):
        load_dataset("mnist", root=tmp_path / "nope")


def test_download_without_torchvision_says_where(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("torchvision"):
            raise ImportError("no torchvision")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(DataError, match=r"torchvision is not usable.*t10k-images-idx3-ubyte"):
        load_dataset("mnist", root=tmp_path, download=True)
