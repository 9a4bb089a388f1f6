"""The parameter update of a K-FAC step: natural-gradient directions, KL-clip, momentum.

Kept apart from :mod:`natgrad.optim.kfac` (hyperparameters, schedule, checkpoints) so that the
optimizer (:func:`natural_directions`, :func:`apply_updates`) and the preconditioner mode
(:func:`write_gradients`) share one implementation of the direction.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from ..factors import Direction
from .relative_clip import RelativeClip

if TYPE_CHECKING:  # pragma: no cover
    from .kfac import KFAC


def gradient_directions(opt: KFAC, hp: dict[str, Any]) -> dict[int, Tensor]:
    """``d = ∇ + wd · p`` per parameter with a gradient (``id(p)`` → tensor)."""
    directions: dict[int, Tensor] = {}
    for g, ghp in zip(opt.param_groups, hp["groups"]):
        for p in g["params"]:
            if p.grad is None:
                continue
            d = p.grad
            if ghp["weight_decay"] != 0:
                d = d.add(p, alpha=ghp["weight_decay"])
            directions[id(p)] = d
    return directions


def solve_layers(opt: KFAC, directions: dict[int, Tensor], hp: dict[str, Any],
                 layer_group: dict[str, int], grad_norms: dict[int, Tensor]
                 ) -> dict[str, Direction]:
    """The natural-gradient direction of every layer whose curvature is ready."""
    requests: dict[str, tuple[list[Tensor], float, Tensor | None]] = {}
    for name, helper in opt.layers.items():
        block = opt.curvature.blocks[name]
        if not block.refreshed:
            continue
        ds = [directions.get(id(p)) for p in helper.params]
        if any(d is None for d in ds):
            continue
        dtype = block.factors[0].dtype
        blocks = [b.to(dtype) for b in helper.matrix_blocks(ds)]
        damping = hp["groups"][layer_group[name]]["damping"]
        norm2 = None  # ‖V‖², known when the direction is the gradient itself
        if all(d is p.grad and d.dtype == dtype for d, p in zip(ds, helper.params)):
            norm2 = sum(grad_norms[id(p)] for p in helper.params)
        requests[name] = (blocks, damping, norm2)
    return opt.distributed.solve_many(requests) if requests else {}


def kl_scale(opt: KFAC, new: dict[str, Direction], hp: dict[str, Any],
             layer_group: dict[str, int]) -> float:
    """``ν = min(1, sqrt(κ / Σ_ℓ η² ⟨∇_ℓ, Δ_ℓ⟩))`` (1 without a KL-clip); the quadratic and
    whether the clip bound are counted in ``opt.clip_record``."""
    if not new:
        return 1.0
    vg = float(sum(hp["groups"][layer_group[n]]["lr"] ** 2 * new[n].inner
                   for n in opt.layers if n in new))
    vg = opt.distributed.agree(vg)  # the same ν (and clip state) on every rank
    kappa = hp["kl_clip"]
    if isinstance(kappa, RelativeClip):
        scale = kappa.scale(vg)
    else:
        scale = min(1.0, (kappa / vg) ** 0.5) if kappa is not None and vg > 0 else 1.0
    opt.clip_record.record(scale < 1.0, vg, kappa)
    return scale


def natural_directions(opt: KFAC, hp: dict[str, Any], layer_group: dict[str, int],
                       grad_norms: dict[int, Tensor]
                       ) -> tuple[dict[int, Tensor], dict[int, float]]:
    """Every parameter's step direction and its KL-clip factor.

    Where the update is a plain step (no momentum) the factored natural-gradient direction is
    added to the parameters right here (``-lr · ν · D``, no dense temporary) and those
    parameters leave the returned directions; otherwise the dense direction replaces the
    gradient and its KL-clip factor goes to ``scales``.
    """
    directions = gradient_directions(opt, hp)
    scales: dict[int, float] = {}
    if not opt.precondition:
        return directions, scales
    new = solve_layers(opt, directions, hp, layer_group, grad_norms)
    scale = kl_scale(opt, new, hp, layer_group)
    for name, D in new.items():
        helper = opt.layers[name]
        ghp = hp["groups"][layer_group[name]]
        params = helper.params
        if ghp["momentum"] == 0 and all(
            p.is_contiguous() and p.dtype == D.blocks[0].dtype for p in params
        ):
            D.add_to_(helper.matrix_blocks([p.data for p in params]), -ghp["lr"] * scale)
            for p in params:
                del directions[id(p)]
            continue
        for p, d in zip(params, helper.split_matrix(D.dense())):
            directions[id(p)] = d.to(p.dtype)
            scales[id(p)] = scale
    return directions, scales


def write_gradients(opt: KFAC, hp: dict[str, Any], layer_group: dict[str, int],
                    grad_norms: dict[int, Tensor]) -> None:
    """Preconditioner mode: each preconditioned parameter's ``.grad`` becomes ``ν · D``, its part
    of the KL-clipped natural-gradient direction, so that a plain step ``p -= lr · p.grad`` is
    exactly :class:`natgrad.KFAC`'s. Other gradients are left as they are."""
    if not opt.precondition:
        return
    new = solve_layers(opt, gradient_directions(opt, hp), hp, layer_group, grad_norms)
    scale = kl_scale(opt, new, hp, layer_group)
    for name, D in new.items():
        helper = opt.layers[name]
        for p, d in zip(helper.params, helper.split_matrix(D.dense())):
            p.grad.copy_(d.mul(scale) if scale != 1.0 else d)


def apply_updates(opt: KFAC, directions: dict[int, Tensor], scales: dict[int, float],
                  hp: dict[str, Any]) -> None:
    """Heavy-ball momentum exactly as ``torch.optim.SGD`` (no dampening), then ``p -= lr · d``."""
    for g, ghp in zip(opt.param_groups, hp["groups"]):
        mu, lr = ghp["momentum"], ghp["lr"]
        for p in g["params"]:
            d = directions.get(id(p))
            if d is None:
                continue
            s = scales.get(id(p), 1.0)
            if mu != 0:
                state = opt.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = d.mul(s) if s != 1.0 else d.clone().detach()
                    state["momentum_buffer"] = buf
                else:
                    buf.mul_(mu).add_(d, alpha=s)
                d, s = buf, 1.0
            p.add_(d, alpha=-lr * s)
