"""Fixtures shared across the test packages."""

from __future__ import annotations

import pytest
import torch.nn.functional as F


def _train(model, opt, batches, sched=None) -> list[float]:
    """An ordinary cross-entropy training loop; the losses, one per batch."""
    losses = []
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


@pytest.fixture
def train():
    """``train(model, opt, batches, sched=None) -> losses``."""
    return _train
