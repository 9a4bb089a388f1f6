"""A fingerprint of model and curvature configuration, compared across ranks at set-up."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist

from ..curvature import KroneckerCurvature
from .env import collective


def model_signature(curvature: KroneckerCurvature, fisher: str = ""
                    ) -> tuple[int, int, int, int]:
    """``(hash, parameter count, tensor count, preconditioned layers)`` of model and curvature.

    The hash covers parameter names, shapes and dtypes, the preconditioned layers with their
    blocks' static labels, the strategy and its options and the Fisher kind: everything that must
    agree across ranks for the collectives to line up.
    """
    h = hashlib.sha256()
    n_params = n_tensors = 0
    for pname, p in curvature.model.named_parameters():
        h.update(f"{pname}:{tuple(p.shape)}:{p.dtype};".encode())
        n_params += p.numel()
        n_tensors += 1
    for label in curvature.describe():
        h.update(f"{label};".encode())
    options = sorted(curvature.options.as_dict().items())
    h.update(f"{curvature.strategy}:{options!r}:{fisher}".encode())
    digest = int.from_bytes(h.digest()[:8], "little") & (2**63 - 1)
    return digest, n_params, n_tensors, len(curvature.blocks)


def check_same_model(curvature: KroneckerCurvature, fisher: str = "", group: Any = None) -> None:
    """Raise ``ValueError`` on every rank when the ranks' model/curvature signatures differ."""
    sig = torch.tensor(model_signature(curvature, fisher), dtype=torch.int64)
    world = dist.get_world_size(group)
    sigs = [torch.empty_like(sig) for _ in range(world)]
    with collective("all_gather (model signature check)", group):
        dist.all_gather(sigs, sig, group=group)
    if all(torch.equal(s, sigs[0]) for s in sigs):
        return
    lines = [
        f"  rank {r}: {int(s[1]):,} parameters in {int(s[2])} tensors, {int(s[3])} preconditioned "
        f"layers, signature {int(s[0]):016x}"
        for r, s in enumerate(sigs)
    ]
    raise ValueError(
        "natgrad.KFAC: the model or the K-FAC configuration differs across ranks (parameter "
        "names/shapes/dtypes, preconditioned layers, factor strategy or options):\n"
        + "\n".join(lines)
    )
