"""The table of optimizers the CLI and benchmarks can build by name.

An entry is a factory ``factory(model, params, lr, loss_kind, **kwargs) -> torch.optim.Optimizer``
and a default learning rate. Adding an optimizer is one entry in :data:`OPTIMIZERS` (import it
inside the factory so this module stays light), e.g.::

    def _kfac(model, params, lr, loss_kind, **kw):
        from .kfac import KFAC
        return KFAC(model, lr=lr, loss=loss_kind, **kw)

    OPTIMIZERS["kfac"] = OptimizerSpec(_kfac, default_lr=..., description="K-FAC")

The model is passed so that curvature-aware optimizers can attach their module hooks; first-order
ones use only ``params``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - the table itself imports no torch (fast CLI help)
    import torch
    from torch import nn

Params = Any  # parameters or param groups
Factory = Callable[..., "torch.optim.Optimizer"]


@dataclass(frozen=True)
class OptimizerSpec:
    """One registry entry.

    Attributes:
        factory: ``factory(model, params, lr, loss_kind, **kwargs) -> Optimizer``.
        default_lr: learning rate used when none is given.
        description: one line for ``--help``.
        lr_by_loss: default learning rates that differ by loss kind (e.g. ``{"bce": 1e-3}`` where
            the summed reconstruction loss makes gradients larger), overriding ``default_lr``.
        strategy: the factor strategy of a plain :class:`natgrad.KFAC` entry (``None`` for
            first-order optimizers and for a preconditioner in front of one).
    """

    factory: Factory
    default_lr: float
    description: str = ""
    lr_by_loss: dict[str, float] = field(default_factory=dict)
    strategy: str | None = None

    def lr_for(self, loss_kind: str) -> float:
        """The default learning rate for a loss kind."""
        return self.lr_by_loss.get(loss_kind, self.default_lr)


def _sgd(model: nn.Module, params: Params, lr: float, loss_kind: str,
         **kw: Any) -> torch.optim.Optimizer:
    import torch

    kw.setdefault("momentum", 0.9)
    return torch.optim.SGD(params, lr=lr, **kw)


def _adam(model: nn.Module, params: Params, lr: float, loss_kind: str,
          **kw: Any) -> torch.optim.Optimizer:
    import torch

    return torch.optim.Adam(params, lr=lr, **kw)


def _adamw(model: nn.Module, params: Params, lr: float, loss_kind: str,
           **kw: Any) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter 2019) at torch's defaults: betas (0.9, 0.999), eps 1e-8,
    weight decay 0.01, lr 1e-3 (Kingma & Ba 2015's Adam default)."""
    import torch

    return torch.optim.AdamW(params, lr=lr, **kw)


def _muon(model: nn.Module, params: Params, lr: float, loss_kind: str,
          **kw: Any) -> torch.optim.Optimizer:
    """torch.optim.Muon on the hidden matrices, AdamW on the rest (see
    :class:`natgrad.optim.peers.MuonWithAdamW` for the sourced defaults). ``params`` is not
    used: the model's parameters are split by role."""
    from .peers import MuonWithAdamW

    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    kw.setdefault("newton_schulz_float32", on_cpu)  # bfloat16 is emulated (slow) on CPUs
    return MuonWithAdamW(model, lr=lr, **kw)


def _peer(name: str, defaults_name: str) -> Factory:
    """A factory for the pytorch-optimizer class ``name`` with the sourced defaults
    :data:`natgrad.optim.peers.<defaults_name>` (imported, with pytorch-optimizer, on use)."""

    def factory(model: nn.Module, params: Params, lr: float, loss_kind: str,
                **kw: Any) -> torch.optim.Optimizer:
        from . import peers

        return peers.pytorch_optimizer(name)(params, lr=lr,
                                             **{**getattr(peers, defaults_name), **kw})

    return factory


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "sgd": OptimizerSpec(
        _sgd, default_lr=0.05, description="SGD, momentum 0.9", lr_by_loss={"bce": 3e-3}
    ),
    "adam": OptimizerSpec(_adam, default_lr=1e-3, description="Adam"),
    "adamw": OptimizerSpec(_adamw, default_lr=1e-3, description="AdamW (weight decay 0.01)"),
    # the optimizers practitioners pick instead (natgrad.optim.peers says where each default
    # comes from); soap, shampoo and kron need the optional pytorch-optimizer (natgrad[peers])
    "muon": OptimizerSpec(
        _muon, default_lr=0.02,
        description="torch Muon on the hidden matrices (lr), AdamW on the rest (adamw_lr 3e-4)",
    ),
    "soap": OptimizerSpec(_peer("SOAP", "SOAP"), default_lr=3e-3,
                          description="SOAP (pytorch-optimizer; natgrad[peers])"),
    "shampoo": OptimizerSpec(
        _peer("ScalableShampoo", "SHAMPOO"), default_lr=1.8e-3,
        description="Shampoo with Adam-style grafting (pytorch-optimizer; natgrad[peers])",
    ),
    "kron": OptimizerSpec(_peer("Kron", "KRON"), default_lr=1e-3,
                          description="PSGD-Kron (pytorch-optimizer; natgrad[peers])"),
}


def get_optimizer_spec(name: str) -> OptimizerSpec:
    """The registry entry for ``name``; ``ValueError`` listing the accepted names otherwise."""
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise ValueError(
            f"unknown optimizer {name!r}; accepted: {', '.join(OPTIMIZERS)}"
        ) from None


def make_optimizer(
    name: str,
    model: nn.Module,
    lr: float | None = None,
    loss_kind: str = "cross_entropy",
    params: Params | None = None,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Build a registered optimizer for ``model``.

    Args:
        name: registry name (``"sgd"``, ``"adam"``, …).
        model: the network (hooked by curvature-aware optimizers).
        lr: learning rate; the entry's default for ``loss_kind`` when ``None``.
        loss_kind: the model's loss kind (see :mod:`natgrad.losses`).
        params: parameters or param groups; ``model.parameters()`` when ``None``.
        **kwargs: passed to the factory (e.g. ``weight_decay``).
    """
    spec = get_optimizer_spec(name)
    if lr is None:
        lr = spec.lr_for(loss_kind)
    if not lr > 0:
        raise ValueError(f"learning rate must be positive, got {lr}")
    if params is None:
        params = model.parameters()
    return spec.factory(model, params, lr, loss_kind, **kwargs)


def _kfac() -> type:
    from .kfac import KFAC

    return KFAC


def _kfac_strategy(strategy: str, optimizer: Callable[[], type] = _kfac,
                   **defaults: Any) -> Factory:
    """A factory for :class:`natgrad.KFAC` (or the subclass ``optimizer()`` returns, imported
    on first use) with the named factor strategy and default options."""

    def factory(model: nn.Module, params: Params, lr: float, loss_kind: str,
                **kw: Any) -> torch.optim.Optimizer:
        kw = {"factors": strategy, **defaults, **kw}
        return optimizer()(model, lr=lr, params=params, loss=loss_kind, **kw)

    return factory


#: the projected K-FAC schedule of ``pkfac`` (also behind ``pkfac+adamw``)
PKFAC = {"curvature_every": 10, "inverse_every": 10, "factor_decay": 0.8}


def _preconditioned(strategy: str, inner: Factory, **defaults: Any) -> Factory:
    """A factory for :class:`natgrad.optim.PreconditionedOptimizer`: :class:`natgrad.KFAC` in
    preconditioner mode (KL-clip at the inner optimizer's current lr) in front of ``inner``."""

    def factory(model: nn.Module, params: Params, lr: float, loss_kind: str,
                **kw: Any) -> torch.optim.Optimizer:
        from .kfac import KFAC
        from .preconditioned import PreconditionedOptimizer

        params = list(params)
        opt = inner(model, params, lr, loss_kind)
        pre_kw = {"factors": strategy, **defaults, **kw}
        pre = KFAC(model, lr=lr, params=params, loss=loss_kind, preconditioner=True, **pre_kw)
        return PreconditionedOptimizer(pre, opt)

    return factory


OPTIMIZERS["kfac"] = OptimizerSpec(
    _kfac_strategy("eigh"), default_lr=0.1, description="K-FAC, dense eigendecompositions",
    strategy="eigh",
)
OPTIMIZERS["rkfac"] = OptimizerSpec(
    _kfac_strategy("recursive"),
    default_lr=0.1,
    description="K-FAC, dense inverses maintained by Woodbury updates",
    strategy="recursive",
)
OPTIMIZERS["pkfac"] = OptimizerSpec(
    # Curvature is refreshed 10x less often than kfac's, so each refresh gets more weight
    # (ρ = 0.8 per refresh): the factors' memory in steps stays comparable to kfac's. The rank
    # is the projected strategy's default, 24 (natgrad.factors.ProjectedOptions).
    _kfac_strategy("projected", **PKFAC),
    default_lr=0.1,
    description="projected K-FAC: rank-24 eigen-subspace + scaled identity, recursive refresh",
    strategy="projected",
)

OPTIMIZERS["pkfac+adamw"] = OptimizerSpec(
    _preconditioned("projected", _adamw, **PKFAC),
    default_lr=1e-3,
    description="projected K-FAC preconditioner (pkfac's schedule) in front of AdamW",
)

def _eigen_adam() -> type:
    """:class:`natgrad.optim.EigenAdam` (its shipped schedule: curvature and bases every 10
    steps, factor decay 0.8, AdamW's weight decay 0.01)."""
    from .eigen_adam_optimizer import EigenAdam

    return EigenAdam


OPTIMIZERS["eigenadam"] = OptimizerSpec(
    # lr: SOAP's default (Vyas et al. 2024), the update being SOAP's in K-FAC's basis
    _kfac_strategy("eigh", _eigen_adam), default_lr=3e-3,
    description="natgrad.EigenAdam: Adam in K-FAC's Kronecker eigenbasis (dense eigh, "
                "refreshed every 10 steps)",
    strategy="eigh",
)
OPTIMIZERS["peigenadam"] = OptimizerSpec(
    _kfac_strategy("projected", _eigen_adam), default_lr=3e-3,
    description="natgrad.EigenAdam(factors='projected'): Adam in projected K-FAC's rank-24 "
                "eigenbasis, Adam on its complement",
    strategy="projected",
)
