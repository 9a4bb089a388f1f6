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
``ν = min(1, sqrt(κ / Σ_ℓ η² ⟨∇_ℓ, Δ_ℓ⟩))`` (by default κ is relative: 4 times the running
geometric mean of that quadratic, :mod:`natgrad.optim.relative_clip`), then fed through
heavy-ball momentum exactly like ``torch.optim.SGD``. Parameters outside recognised layers take
the plain SGD step (:attr:`KFAC.registration_summary` says which and why). The curvature
itself — layers, factors, updates, refreshes and solves — is a
:class:`~natgrad.curvature.KroneckerCurvature` (:attr:`KFAC.curvature`); the statistics come from
its hook capture.
"""

from __future__ import annotations

import dataclasses
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
from ..curvature.hooks import check_capture_options
from ..curvature.outputs import check_output_key
from ..distributed.kfac import resolve as resolve_distributed
from ..factors import FactorRefreshError, KroneckerFactor, get_strategy
from ..factors.options import check_optional_int
from ..layers import LayerHelper
from ..likelihoods import ALIASES, LIKELIHOODS, get_likelihood
from ..norms import finite_total, squared_norms
from . import hyper
from .binding import BindingRecord
from .diagnostics import missing_statistics
from .eigen_adam import EigenAdamOptions, eigen_adam_step, record_bases
from .grafting import GraftOptions, grafted_step
from .relative_clip import RelativeClip
from .update import apply_updates, natural_directions, write_gradients

logger = logging.getLogger("natgrad")

_GROUP_KEYS = ("lr", "momentum", "weight_decay", "damping")
_COUNTERS = ("steps", "skipped_steps", "skipped_curvature_updates", "failed_refreshes")


def _check_choices(precondition: Any, seed: Any, output_key: Any, loss_reduction: Any,
                   accumulation: Any, grad_scaler: Any) -> None:
    """``ValueError`` naming the first argument that is not accepted (before any state)."""
    if not isinstance(precondition, bool):
        raise ValueError(f"invalid precondition={precondition!r}: expected True or False")
    seed_ = hyper.as_number(seed)
    if not isinstance(seed_, int) or isinstance(seed, float) or seed_ < 0:
        raise ValueError(f"invalid seed={seed!r}: expected an integer >= 0")
    check_output_key(output_key)
    check_capture_options(loss_reduction, accumulation)
    if grad_scaler is not None and not callable(getattr(grad_scaler, "get_scale", None)):
        raise ValueError(f"invalid grad_scaler={grad_scaler!r}: expected None or a "
                         "torch.amp.GradScaler")


#: the KL-clip κ of ``kl_clip="auto"`` without a graft. The relative clip (``"relative"``) keeps
#: the lr alive on sequence models where this binds on every step, but it bounds no step's size:
#: as the default it let the README's MNIST recipe, float32 with a tiny damping and the registry
#: transformer diverge (docs/DESIGN.md, "Step size")
DEFAULT_KL_CLIP = 1e-3


def _check_graft(graft: GraftOptions | None, kl_clip: Any, momentum: Any,
                 preconditioner: Any) -> Any:
    """The KL-clip to use: ``kl_clip="auto"`` is the absolute clip κ = :data:`DEFAULT_KL_CLIP`
    for the natural-gradient step, ``None`` with grafting (the graft decides the step length);
    ``ValueError`` for a clip, momentum or preconditioner mode with grafting."""
    if graft is None:
        return DEFAULT_KL_CLIP if isinstance(kl_clip, str) and kl_clip == "auto" else kl_clip
    _refuse_step_options("graft", "the graft decides the step length", "Adam's beta1",
                         "grafting", kl_clip, momentum, preconditioner)
    return None


def _refuse_step_options(mode: str, length: str, beta1: str, taker: str, kl_clip: Any,
                         momentum: Any, preconditioner: Any) -> None:
    """``ValueError`` for a KL-clip, momentum or preconditioner mode beside a ``mode`` that sets
    the step itself (``length``: what decides its length, ``beta1``: its momentum, ``taker``:
    who takes the step)."""
    if not (kl_clip is None or (isinstance(kl_clip, str) and kl_clip == "auto")):
        raise ValueError(f"invalid kl_clip={kl_clip!r} with {mode}: {length} "
                         "(expected 'auto' or None)")
    if callable(momentum) or hyper.normalize("momentum", momentum) != 0:
        raise ValueError(f"invalid momentum={momentum!r} with {mode}: {beta1} is the momentum "
                         "(expected 0)")
    if preconditioner is True:
        raise ValueError(f"invalid preconditioner=True with {mode}: {taker} takes the step")


def _check_eigen_adam(options: EigenAdamOptions | None, graft: GraftOptions | None,
                      kl_clip: Any, momentum: Any, preconditioner: Any, factors: str) -> Any:
    """The KL-clip to use with ``eigen_adam`` (``None``: Adam's second moment decides the step
    length); ``ValueError`` for a clip, momentum, preconditioner mode, a graft or a factor
    strategy that has no eigenbasis."""
    if options is None:
        return kl_clip
    if graft is not None:
        raise ValueError("invalid eigen_adam with graft: choose one (both set the step length)")
    _refuse_step_options("eigen_adam", "the second moment decides the step length", "beta1",
                         "eigen_adam", kl_clip, momentum, preconditioner)
    if not get_strategy(factors).spectral:
        raise ValueError(f"invalid factors={factors!r} with eigen_adam: it needs an eigenbasis "
                         "(expected 'eigh' or 'projected')")
    return None


def _check_clip(kl_clip: Any) -> Any:
    """``"relative"`` → a fresh :class:`RelativeClip`; a ``RelativeClip`` is copied (its running
    scale is this optimizer's); numbers, ``None`` and schedules are checked as ``kl_clip``."""
    if isinstance(kl_clip, str) and kl_clip == "relative":
        return RelativeClip()
    if isinstance(kl_clip, RelativeClip):
        return dataclasses.replace(kl_clip)
    if isinstance(kl_clip, str):
        raise ValueError(f"invalid kl_clip={kl_clip!r}: expected 'auto', 'relative', None, a "
                         "natgrad.optim.RelativeClip, a finite number > 0 or a callable of the "
                         "step")
    hyper.check("kl_clip", kl_clip)
    return kl_clip


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
        kl_clip: the KL-clip ``ν = min(1, sqrt(κ / η² gᵀF⁻¹g))``: κ (a number), ``None`` (off),
            ``"relative"`` or a :class:`~natgrad.optim.RelativeClip` (cut only steps whose
            ``η² gᵀF⁻¹g`` exceeds ``ratio`` times its running geometric mean), or ``"auto"``
            (default): κ = 1e-3, or ``None`` with ``graft``. κ = 1e-3 binds on every step of
            a sequence model with a loss averaged over positions, so there the learning rate
            does nothing (docs/DESIGN.md, "Step size"): use a smaller lr or ``"relative"``,
            which bounds no step's size (the reason it is not the default). How often the clip
            bound is counted in :meth:`diagnostics` and the registration summary, and natgrad
            warns once when it decided most of the first 50 steps (the learning rate then had no
            effect).
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
        output_key: where the logits are when the model returns a structure: ``None`` (a
            tensor, or the ``"logits"`` entry / attribute of a dict or ``ModelOutput``), a key
            or attribute name, or a tuple index (:mod:`natgrad.curvature.outputs`). A loss
            computed inside the model (``model(ids, labels=ids).loss``) works as well: the
            labels are drawn when the backward reaches the logits, and positions the loss leaves
            out (a zero gradient, e.g. the shifted causal-LM loss's last position) get none.
        loss_reduction: how the loss reduces the per-sample negative log-likelihoods, read by
            ``fisher="empirical"`` only (it uses the loss's gradient): ``"batch_mean"`` (the
            mean over samples of per-sample sums over positions, natgrad's convention),
            ``"mean"`` (the mean over every term, e.g. ``F.cross_entropy`` over flattened
            sequence logits) or ``"sum"``.
        accumulation: how several backward passes before one ``step()`` combine, read by
            ``fisher="empirical"`` only: ``"mean"`` (each micro-batch loss divided by the
            number of micro-batches), ``"sum"`` (added as they are) or ``"full_batch"`` (each
            weighted by its share of the step's samples, ``loss_i * n_i / N`` — of its terms
            for ``loss_reduction="mean"`` —, the full-batch loss whatever the micro-batch
            sizes). ``None`` (default): ``"mean"``, with one warning if a step's micro-batches
            differ in size (where ``"mean"`` and ``"full_batch"`` disagree). The Monte-Carlo
            and exact Fishers are right for all.
        grad_scaler: the ``torch.amp.GradScaler`` of a mixed-precision loop: the empirical
            statistics are unscaled, and the statistics of a step the scaler skipped are
            dropped. (``scaler.step(optimizer)`` unscales the gradients before the step.)
        preconditioner: ``True``: ``step()`` leaves the parameters alone and writes the
            natural-gradient direction (damped, KL-clipped with ``lr``) into each preconditioned
            parameter's ``.grad``, for any ``torch.optim`` optimizer to take the step
            (:class:`natgrad.optim.PreconditionedOptimizer` pairs the two); ``momentum`` and
            ``weight_decay`` must then be 0 (they are the other optimizer's).
        graft: ``None`` (default), ``"adam"`` or :class:`~natgrad.optim.GraftOptions`: take
            each preconditioned layer's step length from Adam and only its direction from the
            natural gradient of Adam's first moment; other parameters take Adam's step
            (:mod:`natgrad.optim.grafting`). ``lr`` then has Adam's units; no KL-clip, no
            ``momentum`` (β₁ is the momentum).
        eigen_adam: ``None`` (default), ``True``, a dict or
            :class:`~natgrad.optim.EigenAdamOptions`: Adam in the Kronecker eigenbasis of the
            factors (eigenvalue-corrected K-FAC whose diagonal is a running mean of the squared
            rotated gradient, as SOAP; :mod:`natgrad.optim.eigen_adam`); needs a spectral
            strategy; ``lr`` has Adam's units, weight decay is decoupled, no KL-clip, no
            ``momentum``. Other parameters take AdamW's step.
        max_statistics_rows: ``None`` (default: every row) or the most rows (samples ×
            locations) a Linear / Conv2d layer's statistics take from one forward: a larger
            call contributes its first ``⌈max_statistics_rows / T⌉`` samples, weighted so the
            factors' expectation is unchanged (:func:`natgrad.curvature.hooks.sub_batch`). For
            convolutions, whose patch rows and ``AᵀA`` grow with batch × locations; a layer
            with one location per sample is left alone below ``max_statistics_rows`` samples.

    Every scalar hyperparameter may also be a callable ``step -> value``; numbers may be NumPy
    scalars or one-element tensors, as in ``torch.optim``.
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
        kl_clip: hyper.Schedule = "auto",
        factors: str = "eigh",
        factor_options: Any = None,
        factor_dtype: torch.dtype | None = None,
        precondition: bool = True,
        seed: int = 0,
        distributed: Any = None,
        output_key: str | int | None = None,
        loss_reduction: str = "batch_mean",
        accumulation: str | None = None,
        grad_scaler: Any = None,
        preconditioner: bool = False,
        graft: Any = None,
        eigen_adam: Any = None,
        max_statistics_rows: int | None = None,
    ) -> None:
        # ---- validate everything before any state exists
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        graft_options = GraftOptions.coerce(graft)
        eigen_options = EigenAdamOptions.coerce(eigen_adam)
        kl_clip = _check_eigen_adam(eigen_options, graft_options, kl_clip, momentum,
                                    preconditioner, factors)
        kl_clip = _check_graft(graft_options, kl_clip, momentum, preconditioner)
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay),
                            ("damping", damping), ("factor_decay", factor_decay),
                            ("curvature_every", curvature_every),
                            ("inverse_every", inverse_every)):
            hyper.check(name, value)
        kl_clip = _check_clip(kl_clip)
        if loss not in LIKELIHOODS and loss not in ALIASES:
            raise ValueError(f"invalid loss={loss!r}: accepted values: {sorted(LIKELIHOODS)}")
        fisher = check_fisher(fisher)
        options = get_strategy(factors).Options.coerce(factor_options)
        check_factor_dtype(factor_dtype)
        check_optional_int("max_statistics_rows", max_statistics_rows)
        _check_choices(precondition, seed, output_key, loss_reduction, accumulation,
                       grad_scaler)
        if not isinstance(preconditioner, bool):
            raise ValueError(f"invalid preconditioner={preconditioner!r}: expected True or False")
        if preconditioner:
            for name, value in (("momentum", momentum), ("weight_decay", weight_decay)):
                if callable(value) or hyper.normalize(name, value) != 0:
                    raise ValueError(
                        f"invalid {name}={value!r} with preconditioner=True: momentum and weight "
                        "decay belong to the optimizer that takes the step (expected 0)")
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
        self.precondition = bool(precondition)
        self.preconditioner = preconditioner
        #: Adam grafting (:mod:`natgrad.optim.grafting`), or ``None``
        self.graft = graft_options
        #: Adam in the Kronecker eigenbasis (:mod:`natgrad.optim.eigen_adam`), or ``None``
        self.eigen_adam = eigen_options
        #: layer → the bases its rotated first moment is in (:mod:`natgrad.optim.eigen_adam`)
        self.eigen_adam_bases: dict[str, tuple[Any, Any]] = {}
        optimised = [p for g in self.param_groups for p in g["params"]]
        #: the curvature engine: layers, factors, updates, refreshes, solves
        self.curvature = KroneckerCurvature(net, optimised, strategy=factors, options=options,
                                            factor_dtype=factor_dtype)
        device = next((p.device for p in net.parameters()), torch.device("cpu"))
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(int(hyper.as_number(seed)))
        self._capture = HookCapture(net, self.curvature.layers, get_likelihood(loss),
                                    fisher=fisher, generator=self._generator,
                                    output_key=output_key, loss_reduction=loss_reduction,
                                    accumulation=accumulation, grad_scaler=grad_scaler,
                                    max_rows=max_statistics_rows)
        self.steps = 0
        self.skipped_steps = 0
        self.skipped_curvature_updates = 0
        self.failed_refreshes = 0
        self._warned_sizes = False  # unequal micro-batch sizes (said once)
        #: how often the KL-clip decided the step (:meth:`diagnostics`)
        self.clip_record = BindingRecord("kl_clip")
        self._capture.armed = self.precondition and self._is_curvature_step(0)
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
        lines = [head, *self.curvature.summary_lines()]
        if self.clip_record.steps:
            lines.append(self.clip_record.summary())
        return "\n".join(lines)

    def diagnostics(self) -> dict[str, Any]:
        """What decided the steps so far: the counters (skipped steps and curvature updates,
        failed refreshes) and how often the KL-clip bound (``kl_clip``: steps, bound, fraction,
        the last ``η² gᵀF⁻¹g``)."""
        return {**{c: getattr(self, c) for c in _COUNTERS},
                "kl_clip": self.clip_record.as_dict(),
                "kl_quadratic_last": self.clip_record.last_quadratic}

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
            "kl_clip": (self.kl_clip if isinstance(self.kl_clip, RelativeClip)
                        else hyper.resolve("kl_clip", self.kl_clip, step)),
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
    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.optim.Optimizer.zero_grad``; the statistics of backward passes since the last
        step are dropped with the gradients they belong to (e.g. a step a ``GradScaler``
        skipped). Forwards still waiting for their backward are kept."""
        self._capture.discard_backpropagated()
        super().zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        k = self.steps
        hp = self._resolve_all(k)  # raises before any state changes ...
        arm_next = self.precondition and self._is_curvature_step(k + 1)  # ... this too
        stats = self._capture.collect()
        curvature_step = self.precondition and hp["curvature"]
        stats = self.distributed.reduce_statistics(stats, curvature_step)

        with_grad = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        norms = squared_norms([p.grad for p in with_grad])  # reused by the natural-gradient solve
        if not finite_total(norms):
            self.skipped_steps += 1
            self._warn(f"non-finite gradient at step {k}; step skipped, curvature untouched "
                       f"({self.skipped_steps} skipped so far)")
            self._capture.armed = self.precondition and hp["curvature"]
            return loss
        if curvature_step:  # after the gradient check: a skipped step decides nothing
            for message in missing_statistics(self, stats, self._capture.report):
                self._warn(message)

        layer_group = self._layer_group()
        if self.precondition:
            self._update_curvature(stats, hp, k, layer_group)
        grad_norms = {id(p): n for p, n in zip(with_grad, norms)}
        if self.preconditioner:
            write_gradients(self, hp, layer_group, grad_norms)
        elif self.graft is not None:
            grafted_step(self, hp, layer_group, grad_norms)
        elif self.eigen_adam is not None:
            eigen_adam_step(self, hp)
        else:
            directions, scales = natural_directions(self, hp, layer_group, grad_norms)
            apply_updates(self, directions, scales, hp)
        self.steps += 1
        self._capture.armed = arm_next
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
            "kl_clip_record": self.clip_record.state_dict(),
            **({"relative_clip": self.kl_clip.state_dict()}
               if isinstance(self.kl_clip, RelativeClip) else {}),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load a :meth:`state_dict`. Everything is validated first (layers, strategy, factor
        shapes and kinds, counters, the generator state, torch.optim's parameter groups): a
        failed load raises ``ValueError`` and changes nothing."""
        if not isinstance(state_dict, dict):
            raise ValueError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        state_dict = dict(state_dict)
        extra = state_dict.pop("natgrad", None)
        if extra is not None:
            self._check_natgrad_state(extra)
        try:
            super().load_state_dict(state_dict)  # torch checks its groups before changing them
        except (KeyError, TypeError) as err:
            raise ValueError(f"state_dict is not a KFAC state: {err!r}") from None
        if extra is not None:
            self.curvature.load_state_dict(extra)
            for c in _COUNTERS:
                setattr(self, c, int(extra[c]))
            self._generator.set_state(extra["generator"])
            if "kl_clip_record" in extra:  # absent in checkpoints of natgrad <= 0.1
                self.clip_record.load_state_dict(extra["kl_clip_record"])
            if isinstance(self.kl_clip, RelativeClip) and "relative_clip" in extra:
                self.kl_clip.load_state_dict(extra["relative_clip"])
            self.distributed.after_load(self._generator)
            if self.eigen_adam is not None:
                record_bases(self)
            self._capture.clear()
            self._capture.armed = self.precondition and self._is_curvature_step(self.steps)

    def _check_natgrad_state(self, extra: Any) -> None:
        """``ValueError`` saying what is wrong with the ``"natgrad"`` part of a state dict."""
        if not isinstance(extra, dict):
            raise ValueError("state_dict['natgrad'] must be a dict")
        if extra.get("strategy", self.strategy) != self.strategy:
            raise ValueError(f"state_dict is for the {extra.get('strategy')!r} strategy; this "
                             f"optimizer uses {self.strategy!r}")
        missing = [k for k in (*_COUNTERS, "generator", "factors") if k not in extra]
        if missing:
            raise ValueError(f"state_dict['natgrad'] lacks {missing}")
        for c in _COUNTERS:
            value = extra[c]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"state_dict['natgrad'][{c!r}] must be an integer >= 0, got "
                                 f"{value!r}")
        self.curvature.check_state(extra)
        try:  # a scratch generator of the same kind: set_state validates the bytes
            torch.Generator(device=self._generator.device).set_state(extra["generator"])
        except (RuntimeError, TypeError, ValueError) as err:
            raise ValueError(f"state_dict['natgrad']['generator'] is not a generator state "
                             f"({err})") from None

    def __del__(self) -> None:  # pragma: no cover - best effort
        capture = getattr(self, "_capture", None)
        if capture is not None:
            capture.remove()
