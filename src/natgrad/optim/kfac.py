"""K-FAC natural-gradient descent as a ``torch.optim.Optimizer``.

Usage (an ordinary torch.optim loop; statistics are gathered by hooks)::

    opt = natgrad.KFAC(model, lr=0.1, loss="cross_entropy")
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

Per preconditioned layer the step direction is ``(A ⊗ G + λ I)⁻¹ vec(∇W)`` (exact damping for
spectral factor strategies, π-split otherwise), scaled by the KL-clip factor
``ν = min(1, sqrt(κ / Σ_ℓ η² ⟨∇_ℓ, Δ_ℓ⟩))``, then fed through heavy-ball momentum exactly like
``torch.optim.SGD``. Parameters outside recognised layers take the plain SGD step
(:attr:`KFAC.registration_summary` says which and why). The curvature itself — layers, factors,
updates, refreshes and solves — is a :class:`~natgrad.curvature.KroneckerCurvature`
(:attr:`KFAC.curvature`); the statistics come from its hook capture.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..curvature import (
    HookCapture,
    KroneckerCurvature,
    check_factor_dtype,
    check_fisher,
    unwrap,
)
from ..distributed.kfac import resolve as resolve_distributed
from ..factors import FactorRefreshError, KroneckerFactor, get_strategy
from ..layers import LayerHelper
from ..likelihoods import ALIASES, LIKELIHOODS, get_likelihood
from ..norms import finite_total, squared_norms
from . import hyper
from .update import apply_updates, natural_directions

logger = logging.getLogger("natgrad")

_GROUP_KEYS = ("lr", "momentum", "weight_decay", "damping")
_COUNTERS = ("steps", "skipped_steps", "skipped_curvature_updates", "failed_refreshes")


class KFAC(torch.optim.Optimizer):
    """K-FAC optimizer.

    Args:
        model: the network (may be wrapped in DDP); its Linear / Conv2d layers are preconditioned.
        lr: learning rate η.
        params: parameters or param groups to optimise (default: ``model.parameters()``). Groups
            may set ``lr``, ``momentum``, ``weight_decay`` and ``damping``.
        loss: the likelihood the loss corresponds to: ``"cross_entropy"``, ``"mse"`` (unit
            Gaussian) or ``"bernoulli"`` (sigmoid / BCE-with-logits).
        fisher: ``"mc"`` (labels sampled from the model; true Fisher, default) or
            ``"empirical"`` (the data labels of the user's mean-reduced loss) or ``"exact"``
            (type-2: the expectation over labels in closed form, one extra backward per output
            coordinate; for small outputs and tests).
        damping: Tikhonov damping λ.
        momentum: heavy-ball momentum (as ``torch.optim.SGD``, no dampening).
        weight_decay: L2 penalty added to the gradient before preconditioning.
        factor_decay: EMA decay ρ of the Kronecker factors.
        curvature_every: update the factors every this many steps.
        inverse_every: refresh the factor inverses every this many steps.
        kl_clip: κ of the KL-clip, or ``None`` to disable it.
        factors: factor strategy name (see :data:`natgrad.factors.STRATEGIES`).
        factor_options: the strategy's options: its ``Options`` dataclass (e.g.
            :class:`~natgrad.factors.ProjectedOptions`) or a dict of them (e.g. ``{"rank": 16}``).
        factor_dtype: precision of the factors (default: the layer weight's, at least float32).
        precondition: ``False`` turns the optimizer into ``torch.optim.SGD`` (momentum and
            weight decay kept, no KL-clip): a switch for ablations.
        seed: seed of the private generator used to sample Monte-Carlo labels (the global RNG is
            never touched).
        distributed: data-parallel coordinator (:mod:`natgrad.distributed`). ``None``: automatic
            (:class:`~natgrad.distributed.DistributedKFAC` when a process group with more than
            one rank is initialised, else the single-process no-op); ``False``: never; or a
            ``DistributedKFAC(...)`` with explicit options.

    Every scalar hyperparameter may also be a callable ``step -> value``.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: hyper.Schedule = 0.1,
        *,
        params: Iterable[Any] | None = None,
        loss: str = "cross_entropy",
        fisher: str = "mc",
        damping: hyper.Schedule = 1e-2,
        momentum: hyper.Schedule = 0.0,
        weight_decay: hyper.Schedule = 0.0,
        factor_decay: hyper.Schedule = 0.95,
        curvature_every: hyper.Schedule = 1,
        inverse_every: hyper.Schedule = 10,
        kl_clip: hyper.Schedule = 1e-3,
        factors: str = "eigh",
        factor_options: Any = None,
        factor_dtype: torch.dtype | None = None,
        precondition: bool = True,
        seed: int = 0,
        distributed: Any = None,
    ) -> None:
        # ---- validate everything before any state exists
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay),
                            ("damping", damping), ("factor_decay", factor_decay),
                            ("curvature_every", curvature_every),
                            ("inverse_every", inverse_every), ("kl_clip", kl_clip)):
            hyper.check(name, value)
        if loss not in LIKELIHOODS and loss not in ALIASES:
            raise ValueError(f"invalid loss={loss!r}: accepted values: {sorted(LIKELIHOODS)}")
        fisher = check_fisher(fisher)
        options = get_strategy(factors).Options.coerce(factor_options)
        check_factor_dtype(factor_dtype)
        coordinator = resolve_distributed(distributed)
        net = unwrap(model)
        param_list = list(net.parameters()) if params is None else list(params)
        if isinstance(param_list[0] if param_list else None, dict):
            for group in param_list:
                for key in _GROUP_KEYS:
                    if key in group:
                        hyper.check(key, group[key])

        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, damping=damping)
        super().__init__(param_list, defaults)

        self.model = model
        self.loss = loss
        self.fisher = fisher
        self.factor_decay = factor_decay
        self.curvature_every = curvature_every
        self.inverse_every = inverse_every
        self.kl_clip = kl_clip
        self.precondition = precondition
        optimised = [p for g in self.param_groups for p in g["params"]]
        #: the curvature engine: layers, factors, updates, refreshes, solves
        self.curvature = KroneckerCurvature(net, optimised, strategy=factors, options=options,
                                            factor_dtype=factor_dtype)
        device = next((p.device for p in net.parameters()), torch.device("cpu"))
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(seed)
        self._capture = HookCapture(net, self.curvature.layers, get_likelihood(loss),
                                    fisher=fisher, generator=self._generator)
        self.steps = 0
        self.skipped_steps = 0
        self.skipped_curvature_updates = 0
        self.failed_refreshes = 0
        self._capture.armed = precondition and self._is_curvature_step(0)
        self.distributed = coordinator
        # collective when distributed: checks the model, assigns work
        self.distributed.setup(self.curvature, self._generator, fisher)
        logger.info("natgrad.KFAC registration:\n%s", self.registration_summary)

    # ------------------------------------------------------------------ reporting
    @property
    def layers(self) -> dict[str, LayerHelper]:
        """Preconditioned layers: name → helper."""
        return self.curvature.layers

    @property
    def factors(self) -> dict[str, tuple[KroneckerFactor, ...]]:
        """Name → ``(A, G)``: the factors of each preconditioned layer."""
        return self.curvature.factors

    @property
    def strategy(self) -> str:
        """The factor strategy's name."""
        return self.curvature.strategy

    @property
    def factor_options(self) -> dict[str, Any]:
        """The strategy's options (validated, defaults filled in)."""
        return self.curvature.options.as_dict()

    @property
    def registration_summary(self) -> str:
        """Which layers are preconditioned (factor sizes, strategy, and what was chosen at run time
        such as the ranks of energy-mode projected factors) and which parameters are not, and
        why."""
        head = f"K-FAC ({self.strategy} factors, fisher={self.fisher}, loss={self.loss}):"
        return "\n".join([head, *self.curvature.summary_lines()])

    def memory_usage(self) -> dict[str, int]:
        """Bytes of factor state per layer."""
        return self.curvature.memory_usage()

    # ------------------------------------------------------------------ helpers
    def _is_curvature_step(self, step: int) -> bool:
        return step % hyper.resolve("curvature_every", self.curvature_every, step) == 0

    def _resolve_all(self, step: int) -> dict[str, Any]:
        return {
            "factor_decay": hyper.resolve("factor_decay", self.factor_decay, step),
            "inverse_every": hyper.resolve("inverse_every", self.inverse_every, step),
            "kl_clip": hyper.resolve("kl_clip", self.kl_clip, step),
            "curvature": self._is_curvature_step(step),
            "groups": [
                {k: hyper.resolve(k, g[k], step) for k in _GROUP_KEYS} for g in self.param_groups
            ],
        }

    def _layer_group(self) -> dict[str, int]:
        index = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        return {name: index[id(h.params[0])] for name, h in self.layers.items()}

    def _warn(self, message: str) -> None:
        warnings.warn(f"natgrad.KFAC: {message}", RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        k = self.steps
        hp = self._resolve_all(k)  # raises before any state changes
        stats = self._capture.collect()
        curvature_step = self.precondition and hp["curvature"]
        stats = self.distributed.reduce_statistics(stats, curvature_step)

        with_grad = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        norms = squared_norms([p.grad for p in with_grad])  # reused by the natural-gradient solve
        if not finite_total(norms):
            self.skipped_steps += 1
            self._warn(f"non-finite gradient at step {k}; step skipped, curvature untouched "
                       f"({self.skipped_steps} skipped so far)")
            self._capture.armed = self.precondition and self._is_curvature_step(k)
            return loss

        layer_group = self._layer_group()
        if self.precondition:
            self._update_curvature(stats, hp, k, layer_group)
        directions, scales = natural_directions(
            self, hp, layer_group, {id(p): n for p, n in zip(with_grad, norms)})
        apply_updates(self, directions, scales, hp)
        self.steps += 1
        self._capture.armed = self.precondition and self._is_curvature_step(self.steps)
        return loss

    def _update_curvature(self, stats: dict, hp: dict[str, Any], k: int,
                          layer_group: dict[str, int]) -> None:
        if hp["curvature"] and stats:
            for name in self.distributed.update(stats, hp["factor_decay"]):
                self.skipped_curvature_updates += 1
                self._warn(f"non-finite statistics in layer {name!r} at step {k}; its factors "
                           "are left untouched")
        failures = []
        for name in self.curvature.blocks:
            if not self.curvature.due(name, k, hp["inverse_every"]):
                continue
            try:
                self.distributed.refresh(name, hp["groups"][layer_group[name]]["damping"])
            except FactorRefreshError as err:
                failures.append((name, err))
        failures += self.distributed.synchronize()  # owners' results (distributed only)
        for name, err in failures:
            self.failed_refreshes += 1
            self._warn(f"layer {name!r}: {err}; keeping the previous inverse "
                       f"({self.failed_refreshes} failures)")

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        sd = super().state_dict()
        sd["natgrad"] = {
            **{c: getattr(self, c) for c in _COUNTERS},
            **self.curvature.state_dict(),
            "generator": self._generator.get_state(),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        state_dict = dict(state_dict)
        extra = state_dict.pop("natgrad", None)
        if extra is not None:  # validate every part before changing anything
            if extra.get("strategy", self.strategy) != self.strategy:
                raise ValueError(f"state_dict is for the {extra.get('strategy')!r} strategy; this "
                                 f"optimizer uses {self.strategy!r}")
            self.curvature.check_state(extra)
        super().load_state_dict(state_dict)
        if extra is not None:
            self.curvature.load_state_dict(extra)
            for c in _COUNTERS:
                setattr(self, c, int(extra[c]))
            self._generator.set_state(extra["generator"])
            self.distributed.after_load(self._generator)
            self._capture.clear()
            self._capture.armed = self.precondition and self._is_curvature_step(self.steps)

    def __del__(self) -> None:  # pragma: no cover - best effort
        capture = getattr(self, "_capture", None)
        if capture is not None:
            capture.remove()
