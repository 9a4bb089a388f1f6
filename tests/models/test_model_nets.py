"""Model shapes, the model registry and checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from natgrad.data import DatasetInfo, dataset_info
from natgrad.models import (
    MLP,
    DeepAutoencoder,
    SmallCNN,
    build_model,
    load_checkpoint,
    loss_kind,
    save_checkpoint,
)

MNIST = DatasetInfo("mnist5k", (1, 28, 28), 10)
CIFAR = DatasetInfo("cifar10", (3, 32, 32), 10)
TEACHER = DatasetInfo("teacher", (20,), 4)
ALLOWED = (nn.Linear, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Sequential)


def test_mlp_shapes():
    model = MLP(784, (32, 16), 10)
    assert model(torch.randn(5, 1, 28, 28)).shape == (5, 10)
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [32, 16, 10]


@pytest.mark.parametrize("info", [MNIST, CIFAR])
def test_cnn_shapes(info):
    model = SmallCNN(info.in_channels, info.num_classes, info.image_size)
    assert model(torch.randn(3, *info.input_shape)).shape == (3, 10)


def test_autoencoder_shapes():
    model = DeepAutoencoder()
    widths = [m.out_features for m in model.modules() if isinstance(m, nn.Linear)]
    assert widths == [1000, 500, 250, 30, 250, 500, 1000, 784]
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 784)


@pytest.mark.parametrize("name", ["mlp", "cnn", "autoencoder"])  # the others: test_model_families
def test_registry_builds_from_supported_layers(name):
    model = build_model(name, MNIST)
    for module in model.modules():
        assert isinstance(module, ALLOWED + (DeepAutoencoder,)), type(module)
    out = model(torch.rand(2, 1, 28, 28))
    assert out.shape == ((2, 784) if name == "autoencoder" else (2, 10))


def test_loss_kinds():
    assert loss_kind("mlp") == "cross_entropy" and loss_kind("cnn") == "cross_entropy"
    assert loss_kind("autoencoder") == "bce"


def test_unknown_model_lists_accepted():
    with pytest.raises(ValueError, match="accepted: mlp, cnn, autoencoder"):
        build_model("resnet", MNIST)


def test_invalid_combinations():
    with pytest.raises(ValueError, match="needs an image data set"):
        build_model("cnn", TEACHER)
    with pytest.raises(ValueError, match="takes no hidden widths"):
        build_model("cnn", MNIST, hidden=(10,))
    with pytest.raises(ValueError, match="positive"):
        build_model("mlp", MNIST, hidden=(0,))


def test_same_seed_same_init():
    torch.manual_seed(3)
    a = build_model("mlp", dataset_info("mnist5k"))
    torch.manual_seed(3)
    b = build_model("mlp", dataset_info("mnist5k"))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_checkpoint_round_trip(tmp_path):
    model = build_model("mlp", TEACHER, hidden=(8,))
    path = save_checkpoint(tmp_path / "m.pt", model, "mlp", TEACHER, (8,), optimizer="sgd")
    rebuilt, ckpt = load_checkpoint(path)
    assert ckpt["model"] == "mlp" and ckpt["hidden"] == [8] and ckpt["optimizer"] == "sgd"
    x = torch.randn(4, 20)
    torch.testing.assert_close(rebuilt(x), model(x))
