import pytest
import torch
from torch import nn


@pytest.fixture
def tiny_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X = torch.randn(7, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    return model, X, y


@pytest.fixture
def tiny_cnn():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(2 * 3 * 3, 3),
    ).double()
    X = torch.randn(5, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    return model, X, y
