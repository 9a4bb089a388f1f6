"""Curvature during training: an epoch-end callback for :func:`natgrad.experiments.train.train`.

>>> cb = curvature_callback(train_set.tensors, "cross_entropy", samples=256)
>>> train(model, opt, train_set, test_set, "cross_entropy", config, callbacks=[cb])
>>> cb.records  # [{"epoch": 1, "trace": ..., "top_eigenvalue": ...}, ...]
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..curvature import unwrap
from .ggn import ExactFisher
from .lanczos import lanczos_topk
from .trace import exact_trace


class CurvatureCallback:
    """``cb(epoch, model, row)``: exact trace and largest eigenvalue of the exact Fisher on a
    fixed subset; adds ``fisher_trace`` and ``fisher_top_eigenvalue`` to the history row and
    appends ``{"epoch", "trace", "top_eigenvalue", "residual", "time_s"}`` to :attr:`records`.

    The Fisher is computed on a deep copy of the model put in eval mode (so Dropout/BatchNorm
    models work; the user's model and its mode are not touched).
    """

    def __init__(self, X: Tensor, loss: str, lanczos_steps: int = 30, chunk_size: int = 256
                 ) -> None:
        self.X = X
        self.loss = loss
        self.lanczos_steps = lanczos_steps
        self.chunk_size = chunk_size
        self.records: list[dict[str, Any]] = []

    def __call__(self, epoch: int, model: nn.Module, row: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        frozen = copy.deepcopy(unwrap(model)).eval()
        p = next(frozen.parameters())
        op = ExactFisher(frozen, (self.X.to(device=p.device, dtype=p.dtype),), self.loss,
                         chunk_size=self.chunk_size, cache=True)
        trace = exact_trace(op).value
        top = lanczos_topk(op, k=1, max_steps=self.lanczos_steps, tol=1e-3)
        record = {"epoch": epoch, "trace": trace, "top_eigenvalue": float(top.values[0]),
                  "residual": float(top.residuals[0]), "time_s": time.perf_counter() - t0}
        self.records.append(record)
        row["fisher_trace"] = record["trace"]
        row["fisher_top_eigenvalue"] = record["top_eigenvalue"]


def curvature_callback(data: Sequence[Tensor], loss: str, samples: int = 256, seed: int = 0,
                       **kwargs: Any) -> CurvatureCallback:
    """A :class:`CurvatureCallback` on ``samples`` inputs drawn once (seeded) from ``data[0]``."""
    X = data[0]
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(X.shape[0], generator=gen)[: min(samples, X.shape[0])]
    return CurvatureCallback(X[idx], loss, **kwargs)
