"""K-FAC natural-gradient descent for Linear and Conv2d layers, as a ``torch.optim.Optimizer``.

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
``torch.optim.SGD``. Parameters outside recognised layers (BatchNorm, embeddings, ...) take the
plain SGD step. How a factor is stored and inverted is the business of the factor strategy
(:mod:`natgrad.factors`), chosen with ``factors=``.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..capture import FISHER_TYPES, CurvatureCapture
from ..distributed.kfac import resolve as resolve_distributed
from ..factors import STRATEGIES, Direction, FactorRefreshError, KroneckerFactor, make_factor
from ..layers import LayerHelper, helper_for
from ..likelihoods import ALIASES, LIKELIHOODS, get_likelihood
from ..norms import finite_total, squared_norms, to_floats
from . import hyper

logger = logging.getLogger("natgrad")

_GROUP_KEYS = ("lr", "momentum", "weight_decay", "damping")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel,
                                              nn.DataParallel)) else model


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
        factor_options: extra keyword arguments for the strategy (e.g. ``rank``).
        factor_dtype: precision of the factors (default: the layer weight's).
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
        factor_options: dict[str, Any] | None = None,
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
        if fisher not in FISHER_TYPES:
            raise ValueError(f"invalid fisher={fisher!r}: accepted values: {list(FISHER_TYPES)}")
        if factors not in STRATEGIES:
            raise ValueError(f"invalid factors={factors!r}: accepted values: {sorted(STRATEGIES)}")
        if factor_dtype is not None and not (
            isinstance(factor_dtype, torch.dtype) and factor_dtype.is_floating_point
        ):
            raise ValueError(
                f"invalid factor_dtype={factor_dtype!r}: expected None or a floating torch.dtype "
                "(torch.float32, torch.float64, ...)"
            )
        if factor_options is not None and not isinstance(factor_options, dict):
            raise ValueError("invalid factor_options: expected a dict of keyword arguments or None")
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
        self.strategy = factors
        self.factor_options = dict(factor_options or {})
        self.factor_decay = factor_decay
        self.curvature_every = curvature_every
        self.inverse_every = inverse_every
        self.kl_clip = kl_clip
        self.precondition = precondition

        # ---- layers: which modules are preconditioned, which parameters are not
        optimised = {id(p) for g in self.param_groups for p in g["params"]}
        self.layers: dict[str, LayerHelper] = {}
        self._skipped_layers: dict[str, str] = {}
        for name, module in net.named_modules():
            helper, reason = helper_for(module)
            if helper is None:
                if reason is not None:
                    self._skipped_layers[name] = reason
                continue
            if not all(id(p) in optimised and p.requires_grad for p in helper.params):
                self._skipped_layers[name] = "not all of its parameters are optimised"
                continue
            shared = [owner for p in helper.params
                      for owner, h in self.layers.items() if any(p is q for q in h.params)]
            if shared:  # tied weights: one Kronecker block per parameter
                self._skipped_layers[name] = f"shares parameters with layer {shared[0]!r}"
                continue
            self.layers[name] = helper
        self._param_layer: dict[int, tuple[str, int]] = {
            id(p): (name, i) for name, h in self.layers.items() for i, p in enumerate(h.params)
        }

        # ---- factors
        self.factors: dict[str, tuple[KroneckerFactor, KroneckerFactor]] = {}
        for name, helper in self.layers.items():
            w = helper.module.weight
            opts = dict(dtype=factor_dtype or w.dtype, device=w.device, **self.factor_options)
            self.factors[name] = (
                make_factor(factors, helper.in_dim, **opts),
                make_factor(factors, helper.out_dim, **opts),
            )

        # ---- statistics capture
        device = next((p.device for p in net.parameters()), torch.device("cpu"))
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(seed)
        self._capture = CurvatureCapture(
            net, self.layers, get_likelihood(loss), fisher=fisher, generator=self._generator
        )
        self.steps = 0
        self.skipped_steps = 0
        self.skipped_curvature_updates = 0
        self.failed_refreshes = 0
        self._capture.active = precondition and self._is_curvature_step(0)
        self.distributed = resolve_distributed(distributed)
        self.distributed.setup(self)  # collective when distributed: checks the model, assigns work
        logger.info("natgrad.KFAC registration:\n%s", self.registration_summary)

    # ------------------------------------------------------------------ reporting
    @property
    def registration_summary(self) -> str:
        """Which layers are preconditioned (factor sizes, strategy, and what was chosen at run time
        such as the ranks of energy-mode projected factors) and which parameters are not."""
        lines = [f"K-FAC ({self.strategy} factors, fisher={self.fisher}, loss={self.loss}):"]

        def label(f: KroneckerFactor) -> str:
            state = f.state_summary()
            return f"{f.describe()} [{state}]" if state else f.describe()

        for name, helper in self.layers.items():
            A, G = self.factors[name]
            lines.append(
                f"  preconditioned  {name or '<model>'} [{helper.kind}] "
                f"A: {label(A)}  G: {label(G)}"
            )
        for name, reason in self._skipped_layers.items():
            lines.append(f"  plain step      {name} ({reason})")
        covered = set(self._param_layer)
        net = unwrap(self.model)
        names = {id(p): n for n, p in net.named_parameters()}
        plain = [names.get(id(p), "?") for g in self.param_groups for p in g["params"]
                 if id(p) not in covered]
        if plain:
            lines.append(f"  parameters with the plain (momentum) step: {', '.join(plain)}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ helpers
    def _is_curvature_step(self, step: int) -> bool:
        return step % hyper.resolve("curvature_every", self.curvature_every, step) == 0

    def _resolve_all(self, step: int) -> dict[str, Any]:
        hp = {
            "factor_decay": hyper.resolve("factor_decay", self.factor_decay, step),
            "inverse_every": hyper.resolve("inverse_every", self.inverse_every, step),
            "kl_clip": hyper.resolve("kl_clip", self.kl_clip, step),
            "curvature": self._is_curvature_step(step),
            "groups": [
                {k: hyper.resolve(k, g[k], step) for k in _GROUP_KEYS} for g in self.param_groups
            ],
        }
        return hp

    def _layer_group(self) -> dict[str, int]:
        index = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        return {name: index[id(h.params[0])] for name, h in self.layers.items()}

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
        stats = self.distributed.reduce_statistics(stats, self.precondition and hp["curvature"])

        with_grad = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        norms = squared_norms([p.grad for p in with_grad])  # reused by the natural-gradient solve
        if not finite_total(norms):
            self.skipped_steps += 1
            warnings.warn(
                f"natgrad.KFAC: non-finite gradient at step {k}; step skipped, curvature untouched "
                f"({self.skipped_steps} skipped so far)",
                RuntimeWarning,
                stacklevel=2,
            )
            self._capture.active = self.precondition and self._is_curvature_step(k)
            return loss

        layer_group = self._layer_group()
        if self.precondition:
            self._update_curvature(stats, hp, k, layer_group)

        # directions d = ∇ + wd·p, then natural-gradient directions for layers with a curvature;
        # the KL-clip factor is kept apart (``scales``) and folded into the update below
        directions: dict[int, Tensor] = {}
        scales: dict[int, float] = {}
        for g, ghp in zip(self.param_groups, hp["groups"]):
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if ghp["weight_decay"] != 0:
                    d = d.add(p, alpha=ghp["weight_decay"])
                directions[id(p)] = d

        if self.precondition:
            grad_norms = {id(p): n for p, n in zip(with_grad, norms)}
            self._precondition(directions, scales, hp, layer_group, grad_norms)

        for g, ghp in zip(self.param_groups, hp["groups"]):
            mu, lr = ghp["momentum"], ghp["lr"]
            for p in g["params"]:
                d = directions.get(id(p))
                if d is None:
                    continue
                s = scales.get(id(p), 1.0)
                if mu != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = d.mul(s) if s != 1.0 else d.clone().detach()
                        state["momentum_buffer"] = buf
                    else:
                        buf.mul_(mu).add_(d, alpha=s)
                    d, s = buf, 1.0
                p.add_(d, alpha=-lr * s)

        self.steps += 1
        self._capture.active = self.precondition and self._is_curvature_step(self.steps)
        return loss

    def _update_curvature(
        self, stats: dict, hp: dict[str, Any], k: int, layer_group: dict[str, int]
    ) -> None:
        if hp["curvature"] and stats:
            items = []
            sq = to_floats(squared_norms([t for st in stats.values() for t in (st.a, st.g)]))
            for (name, st), a_sq, g_sq in zip(stats.items(), sq[0::2], sq[1::2]):
                st.a_sq, st.g_sq = a_sq, g_sq
                if not (math.isfinite(a_sq) and math.isfinite(g_sq)):
                    self.skipped_curvature_updates += 1
                    warnings.warn(f"natgrad.KFAC: non-finite statistics in layer {name!r} at "
                                  f"step {k}; its factors are left untouched", RuntimeWarning,
                                  stacklevel=3)
                    continue
                items.append((name, *self.factors[name], st))
            self.distributed.update_all(items, hp["factor_decay"])
        for name, (A, G) in self.factors.items():
            if A.updates == 0 or G.updates == 0:
                continue
            if A.refreshed and G.refreshed and k % hp["inverse_every"] != 0:
                continue
            damping = hp["groups"][layer_group[name]]["damping"]
            try:
                self.distributed.refresh_pair(name, A, G, damping)
            except FactorRefreshError as err:
                self.failed_refreshes += 1
                warnings.warn(f"natgrad.KFAC: layer {name!r}: {err}; keeping the previous "
                              f"inverse ({self.failed_refreshes} failures)", RuntimeWarning,
                              stacklevel=3)
        for name, err in self.distributed.synchronize():  # owners' results (distributed only)
            self.failed_refreshes += 1
            warnings.warn(f"natgrad.KFAC: layer {name!r}: {err}; keeping the previous "
                          f"inverse ({self.failed_refreshes} failures)", RuntimeWarning,
                          stacklevel=3)

    def _precondition(
        self,
        directions: dict[int, Tensor],
        scales: dict[int, float],
        hp: dict[str, Any],
        layer_group: dict[str, int],
        grad_norms: dict[int, Tensor],
    ) -> None:
        """Natural-gradient directions for the layers with a curvature, scaled by the KL-clip.

        Where the update is a plain step (no momentum) the factored direction is added to the
        parameters right here and their entries leave ``directions``; otherwise the dense
        direction replaces the entry and its KL-clip factor goes to ``scales``.
        """
        new: dict[str, Direction] = {}
        for name, helper in self.layers.items():
            A, G = self.factors[name]
            if not (A.refreshed and G.refreshed):
                continue
            ds = [directions.get(id(p)) for p in helper.params]
            if any(d is None for d in ds):
                continue
            blocks = [b.to(A.dtype) for b in helper.matrix_blocks(ds)]
            damping = hp["groups"][layer_group[name]]["damping"]
            norm2 = None  # ‖V‖², known when the direction is the gradient itself
            if all(d is p.grad and d.dtype == A.dtype for d, p in zip(ds, helper.params)):
                norm2 = sum(grad_norms[id(p)] for p in helper.params)
            new[name] = self.distributed.precondition(name, blocks, A, G, damping, norm2)
        if not new:
            return
        scale = 1.0
        if hp["kl_clip"] is not None:
            vg = float(sum(hp["groups"][layer_group[n]]["lr"] ** 2 * D.inner
                           for n, D in new.items()))
            if vg > 0:
                scale = min(1.0, (hp["kl_clip"] / vg) ** 0.5)
        for name, D in new.items():
            helper = self.layers[name]
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

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        sd = super().state_dict()
        sd["natgrad"] = {
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "skipped_curvature_updates": self.skipped_curvature_updates,
            "failed_refreshes": self.failed_refreshes,
            "strategy": self.strategy,
            "factors": {n: (A.state_dict(), G.state_dict()) for n, (A, G) in self.factors.items()},
            "generator": self._generator.get_state(),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        state_dict = dict(state_dict)
        extra = state_dict.pop("natgrad", None)
        if extra is not None:
            if set(extra["factors"]) != set(self.factors):
                raise ValueError(
                    "state_dict holds factors for layers "
                    f"{sorted(extra['factors'])}, this optimizer has {sorted(self.factors)}"
                )
            # validate every factor before changing anything
            for name, (sa, sg) in extra["factors"].items():
                A, G = self.factors[name]
                for f, s in ((A, sa), (G, sg)):
                    if s.get("strategy") != f.name or s.get("dim") != f.dim:
                        raise ValueError(
                            f"state_dict factor of layer {name!r} is {s.get('strategy')!r} "
                            f"(d={s.get('dim')}); expected {f.name!r} (d={f.dim})"
                        )
        super().load_state_dict(state_dict)
        if extra is not None:
            for name, (sa, sg) in extra["factors"].items():
                A, G = self.factors[name]
                A.load_state_dict(sa)
                G.load_state_dict(sg)
            self.steps = int(extra["steps"])
            self.skipped_steps = int(extra["skipped_steps"])
            self.skipped_curvature_updates = int(extra["skipped_curvature_updates"])
            self.failed_refreshes = int(extra["failed_refreshes"])
            self._generator.set_state(extra["generator"])
            self.distributed.after_load(self)
            self._capture.clear()
            self._capture.active = self.precondition and self._is_curvature_step(self.steps)

    def memory_usage(self) -> dict[str, int]:
        """Bytes of factor state per layer."""
        return {n: A.state_bytes() + G.state_bytes() for n, (A, G) in self.factors.items()}

    def __del__(self) -> None:  # pragma: no cover - best effort
        capture = getattr(self, "_capture", None)
        if capture is not None:
            capture.remove()
