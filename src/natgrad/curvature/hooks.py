"""The optimizer's capture: Kronecker statistics from the user's own forward and backward passes.

While :attr:`HookCapture.armed` (the optimizer arms it for curvature steps only), forward hooks on
the preconditioned layers record each call's input rows ``ā`` and the gradient edge of its output,
and a hook on the model finds the logits (:mod:`.outputs`). The output gradients ``g`` come

* ``fisher="empirical"``: from the user's own ``loss.backward()``, read where it passes the layer
  output (a pre-hook on that autograd node, immune to later in-place ops);
* ``fisher="mc"`` / ``"exact"``: from a pull-back of the Monte-Carlo / Hessian-square-root
  directions (:mod:`.rows`) to the layer outputs, run *inside* the user's backward the moment it
  reaches the logits (a pre-hook on the autograd node that made them), so the labels are drawn
  only for outputs that are really backpropagated, and the graph is still whole. This works
  whether the loss is computed outside the model or inside it (``model(x, labels=y).loss``, the
  Hugging Face pattern: the model's output is then a mapping whose ``logits`` entry is found as
  by :mod:`.outputs`).

**Positions the loss uses.** The gradient the user's backward brings to the logits says which
positions the loss uses: a position whose gradient is exactly zero (a shifted causal-LM loss
leaves the last position without a target, ``ignore_index`` masks padding) is left out of the
Monte-Carlo / exact directions, and of the term count of ``loss_reduction="mean"``, so the
statistics are those of the loss actually computed. (A cross-entropy gradient is never exactly
zero at a used position.)

**Non-finite outputs.** A pass whose logits cannot give finite directions (NaN / inf) commits no
statistics; :attr:`CaptureReport.nonfinite` names its layers so that the optimizer warns once and
skips the curvature update of that step (no layer is dropped for it).

**Statistics are committed only by a backward.** A forward that is never backpropagated (an
extra train-mode forward, a metric) leaves no trace and draws no label; hooks skip eval mode,
``torch.no_grad()`` and ``torch.func`` transforms (``vmap``/``jacrev`` over the model work while an
optimizer exists). Several forward/backward passes before one step (accumulation) add up;
:meth:`HookCapture.discard_backpropagated` drops the committed ones (``optimizer.zero_grad()``
calls it: those statistics belong to gradients being thrown away, e.g. a step a ``GradScaler``
skipped).

The user's model is never modified: no attributes are set on it, and its train/eval mode is read,
never changed, and its output is returned as it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from ..factors.options import check_optional_int
from ..layers import LayerHelper
from ..likelihoods import Likelihood
from .outputs import check_output_key, find_output
from .rows import output_directions, pullback
from .statistics import LayerStatistics, check_fisher

#: how the user's loss is reduced, for the empirical Fisher (which reads its gradient)
LOSS_REDUCTIONS = ("batch_mean", "mean", "sum")
#: how gradient accumulation combines the micro-batch losses
ACCUMULATIONS = ("mean", "sum", "full_batch")


def check_capture_options(loss_reduction: object, accumulation: object) -> None:
    """``ValueError`` naming ``loss_reduction`` or ``accumulation`` when not accepted."""
    if loss_reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"invalid loss_reduction={loss_reduction!r}: accepted values: "
                         f"{list(LOSS_REDUCTIONS)}")
    if accumulation is not None and accumulation not in ACCUMULATIONS:
        raise ValueError(f"invalid accumulation={accumulation!r}: accepted values: "
                         f"{list(ACCUMULATIONS)} (or None: 'mean', with a warning when the "
                         "micro-batches of a step differ in size)")


def _transformed(t: Tensor) -> bool:
    """Whether ``t`` is a ``torch.func`` (vmap / grad / jvp) wrapper."""
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))


@dataclass
class _Record:
    """One call of a layer during a pass."""

    name: str
    a: Tensor  # (n, d_A) input rows
    samples: int
    locations: int
    edge: Any  # the GradientEdge of the layer output
    g: list[Tensor] = field(default_factory=list)  # output-gradient rows, one entry per backward
    reached: bool = False  # the user's backward passed the layer output
    handle: Any = None
    kept: Any = None  # the helper's record of the forward (LayerHelper.record)
    sub: int | None = None  # statistics from the first ``sub`` samples only (max_rows)

    @property
    def weight(self) -> float:
        """The weight of the rows of the first :attr:`sub` samples, ``√(samples / sub)``."""
        return 1.0 if self.sub is None else math.sqrt(self.samples / self.sub)


@dataclass
class _Pass:
    """One forward of the model (or the layer calls made outside any forward of it)."""

    records: list[_Record] = field(default_factory=list)
    output: Tensor | None = None  # the logits' value (mc / exact) or None
    edge: Any = None  # the logits' GradientEdge
    handle: Any = None  # the pre-hook on the logits' autograd node
    samples: int | None = None  # the batch size of the model output
    terms: int | None = None  # likelihood terms in the pass (for loss_reduction="mean")
    scale: float = 1.0  # the grad scaler's scale at the forward
    tapped: bool = False  # the backward reached the logits (mc / exact: the pull-back ran)
    finite: bool = True  # False: the logits gave non-finite directions; no statistics

    @property
    def backpropagated(self) -> bool:
        return self.tapped or any(r.g for r in self.records)


@dataclass
class CaptureReport:
    """What the last :meth:`HookCapture.collect` saw, for the optimizer's warnings.

    Attributes:
        called: layers whose forward ran (and was recorded) since the previous collect.
        complete: layers with statistics.
        without_output: layers the backward reached although the model output the labels are
            sampled from was never backpropagated (the forward did not go through the model,
            or the loss ignores its output): no Monte-Carlo / exact rows for them.
        nonfinite: layers of passes whose logits were not finite (no directions to pull back):
            no statistics this step.
        unequal_sizes: the sizes (samples, or terms for ``loss_reduction="mean"``) of the
            micro-batches of a step when they differ and ``accumulation`` was left at its
            default (``None``); empty otherwise.
    """

    called: set[str] = field(default_factory=set)
    complete: set[str] = field(default_factory=set)
    without_output: set[str] = field(default_factory=set)
    nonfinite: set[str] = field(default_factory=set)
    unequal_sizes: list[int] = field(default_factory=list)


def sub_batch(helper: LayerHelper, samples: int, locations: int,
              max_rows: int | None) -> int | None:
    """How many leading samples of a call give its statistics: ``None`` (all) unless the helper's
    rows are per sample and location (Linear, Conv2d: :attr:`LayerHelper.per_sample_rows`) and
    ``samples · locations > max_rows``; then ``k = max(1, ⌈max_rows / locations⌉)``.

    With rows ``ā``, ``g`` of the first ``k`` of ``m`` samples weighted by ``√(m / k)``,
    ``(1/m) Σ (m/k) ā āᵀ = (1/k) Σ_{n ≤ k} ā āᵀ``: the factors' expectation over samples is
    unchanged (each is estimated from fewer of them), and so is the weight of this call against
    the other calls and passes of the step. The point is cost: a convolution's patch rows and
    ``AᵀA`` scale with ``m · T`` (25,088 rows per call for 32 images of 28 × 28)."""
    if max_rows is None or not helper.per_sample_rows or samples * locations <= max_rows:
        return None
    sub = max(1, -(-max_rows // locations))
    return sub if sub < samples else None


def _g_rows(helper: LayerHelper, record: _Record, grads: Tensor) -> Tensor:
    """The ``G`` rows of output gradients ``(R, m, ...)`` for ``record``: of its first
    :attr:`_Record.sub` samples, weighted as its ``A`` rows, when it keeps only those."""
    if record.sub is None:
        return helper.g_rows(grads, record.kept)
    return helper.g_rows(grads[:, :record.sub], record.kept) * record.weight


class HookCapture:
    """Hooks on ``layers`` (name → helper) of ``model`` that collect :class:`LayerStatistics`.

    Args:
        model: the module whose forward produces the output (DDP already unwrapped).
        layers: the preconditioned layers.
        likelihood: how the output is read.
        fisher: ``"mc"``, ``"empirical"`` or ``"exact"``.
        generator: draws the Monte-Carlo labels.
        output_key: where the logits are in the model's output (:mod:`.outputs`).
        loss_reduction: for ``"empirical"``: ``"batch_mean"`` (the loss is the batch mean of
            per-sample negative log-likelihoods, each summed over positions: natgrad's
            convention), ``"mean"`` (the mean over every term, torch's default for flattened
            sequence logits or elementwise losses) or ``"sum"``.
        accumulation: for ``"empirical"``: ``"mean"`` (each of the ``K`` micro-batch losses of
            a step divided by ``K``), ``"sum"`` (summed as they are) or ``"full_batch"`` (each
            weighted by its share of the step's samples, ``loss_i · n_i / N`` — of its terms
            ``t_i / T`` for ``loss_reduction="mean"`` — so the accumulated loss is the
            full-batch loss whatever the micro-batch sizes). ``None`` (default): ``"mean"``,
            and :attr:`CaptureReport.unequal_sizes` lists the sizes when a step's micro-batches
            differ (then ``"mean"`` and ``"full_batch"`` disagree).
        grad_scaler: a ``torch.amp.GradScaler`` whose scale the user's gradients carry.
        max_rows: ``None`` (default: every row) or the most rows ``m · T`` (samples × locations)
            a Linear / Conv2d call contributes: a call with more gives the rows of its first
            ``k = ⌈max_rows / T⌉`` samples only, each weighted by ``√(m / k)`` in both ``A``
            and ``G``, which leaves the factors' expectation unchanged (:func:`sub_batch`).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: dict[str, LayerHelper],
        likelihood: Likelihood,
        fisher: str = "mc",
        generator: torch.Generator | None = None,
        *,
        output_key: str | int | None = None,
        loss_reduction: str = "batch_mean",
        accumulation: str | None = None,
        grad_scaler: Any = None,
        max_rows: int | None = None,
    ) -> None:
        self.fisher = check_fisher(fisher)
        check_capture_options(loss_reduction, accumulation)
        self.max_rows = check_optional_int("max_statistics_rows", max_rows)
        self.model = model
        self.layers = layers
        self.likelihood = likelihood
        self.generator = generator
        self.output_key = check_output_key(output_key)
        self.loss_reduction = loss_reduction
        self.accumulation = accumulation if accumulation is not None else "mean"
        self._size_check = accumulation is None
        self.grad_scaler = grad_scaler
        self.report = CaptureReport()
        self._passes: list[_Pass] = []
        self._current: _Pass | None = None
        self._orphans: _Pass | None = None  # layer calls outside any model forward
        self._handles: list[Any] = []
        self._armed = False
        self._removed = False

    # ------------------------------------------------------------------ arming
    @property
    def armed(self) -> bool:
        """Whether forward passes are recorded. The hooks are attached only while armed, so steps
        without a curvature update run the model exactly as without natgrad."""
        return self._armed

    @armed.setter
    def armed(self, value: bool) -> None:
        value = bool(value)
        if value and not self._handles and not self._removed:
            self._handles = [  # the helper's hooks: its target may be inside the module
                handle for name, helper in self.layers.items()
                for handle in helper.register_hooks(self._layer_hook(name, helper))
            ]
            self._handles.append(self.model.register_forward_pre_hook(self._model_pre_hook))
            self._handles.append(self.model.register_forward_hook(self._model_hook))
        elif not value and self._handles:
            self._detach()
        self._armed = value and not self._removed

    #: the name the switch had before the curvature engine
    active = armed

    # ------------------------------------------------------------------ hooks
    def _recording(self, module: nn.Module, output: Any) -> bool:
        return (self._armed and module.training and torch.is_grad_enabled()
                and isinstance(output, Tensor) and output.requires_grad
                and not _transformed(output))

    def _model_pre_hook(self, module: nn.Module, args: Any) -> None:
        if self._armed and module.training and torch.is_grad_enabled():
            scale = float(self.grad_scaler.get_scale()) if self.grad_scaler is not None else 1.0
            self._current = _Pass(scale=scale)

    def _layer_hook(self, name: str, helper: LayerHelper) -> Callable:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if name not in self.layers or not self._recording(module, output):
                return  # (a layer taken out of preconditioning since the hooks were attached)
            x = inputs[0].detach()
            edge = get_gradient_edge(output)
            samples, locations = x.shape[0], helper.locations(output)
            sub = sub_batch(helper, samples, locations, self.max_rows)
            kept = helper.record(x[:sub], output[:sub])  # [:None] is the whole call
            record = _Record(name, helper.a_rows(kept), samples, locations, edge, kept=kept,
                             sub=sub)
            if sub is not None:
                record.a = record.a * record.weight  # and so are its G rows (_g_rows)
            record.handle = edge.node.register_prehook(self._grad_hook(record, helper))
            owner = self._current
            if owner is None:  # called outside a forward of the model
                if self._orphans is None:
                    self._orphans = _Pass()
                owner = self._orphans
            owner.records.append(record)

        return hook

    def _grad_hook(self, record: _Record, helper: LayerHelper) -> Callable:
        index = record.edge.output_nr

        def hook(grad_outputs: tuple[Tensor | None, ...]) -> None:
            record.reached = True
            grad = grad_outputs[index]
            if self.fisher == "empirical" and grad is not None:
                record.g.append(_g_rows(helper, record, grad.detach()[None]))
            return None

        return hook

    def _model_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        current, self._current = self._current, None
        if current is None:
            return
        self._passes.append(current)
        logits = find_output(output, self.output_key)
        if _transformed(logits):
            return
        current.samples = int(logits.shape[0])
        current.terms = current.samples * self.likelihood.positions(logits)
        if not logits.requires_grad or not current.records:
            return
        if self.fisher != "empirical":
            current.output = logits.detach().clone()
        current.edge = get_gradient_edge(logits)
        current.handle = current.edge.node.register_prehook(self._logits_hook(current))

    def _logits_hook(self, p: _Pass) -> Callable:
        """Pre-hook on the logits' autograd node: fires when the user's backward reaches the
        logits, wherever the loss was computed (outside the model or inside it)."""
        index = p.edge.output_nr

        def hook(grad_outputs: tuple[Tensor | None, ...]) -> None:
            grad = grad_outputs[index]
            if grad is not None:
                self._pull(p, grad.detach())
            return None

        return hook

    def _used_positions(self, grad: Tensor) -> Tensor:
        """``(m, P)``: the positions whose loss gradient is not exactly zero (used by the
        loss)."""
        return (self.likelihood.events(grad) != 0).any(-1)

    def _pull(self, p: _Pass, grad: Tensor) -> None:
        """Inside the user's backward, at the logits (whose incoming gradient is ``grad``): the
        Monte-Carlo / exact rows of the pass, restricted to the positions the loss uses; for the
        empirical Fisher only the count of those positions."""
        if p.tapped:
            return
        p.tapped = True
        used = self._used_positions(grad)
        if self.fisher == "empirical":
            p.terms = int(used.sum())
            return
        assert p.output is not None
        directions = self._directions(p.output)
        if directions is None:
            p.finite = False  # nothing sensible to sample from (reported by collect)
            return
        if not bool(used.all()):
            R, m, P = directions.shape[0], *used.shape
            mask = used.to(directions.dtype).reshape(1, m, P, 1)
            directions = (directions.reshape(R, m, P, -1) * mask).reshape(directions.shape)
        with torch.enable_grad():
            grads = pullback(p.edge, [r.edge for r in p.records], directions)
        for record, g in zip(p.records, grads):
            if g is not None:
                record.g.append(_g_rows(self.layers[record.name], record, g.detach()))

    def _directions(self, output: Tensor) -> Tensor | None:
        """The Monte-Carlo / exact directions for ``output``, or ``None`` when they are not
        finite (NaN / inf logits; ``-inf`` logits of excluded classes are fine)."""
        if bool(torch.isfinite(output).all()):
            return output_directions(self.likelihood, self.fisher, output,
                                     generator=self.generator)
        try:
            directions = output_directions(self.likelihood, self.fisher, output,
                                           generator=self.generator)
        except RuntimeError:  # torch.multinomial refuses NaN / inf probabilities
            return None
        return directions if bool(torch.isfinite(directions).all()) else None

    # ------------------------------------------------------------------ API
    def _all_passes(self) -> list[_Pass]:
        passes = list(self._passes)
        if self._orphans is not None:
            passes.append(self._orphans)
        return passes

    def collect(self) -> dict[str, LayerStatistics]:
        """Statistics of the backpropagated passes since the last call, per layer (layers without
        any omitted); :attr:`report` says what was seen. Clears everything.

        When a pass's logits were not finite, nothing is committed for the step (its layers are
        listed in :attr:`CaptureReport.nonfinite`)."""
        passes = self._all_passes()
        report = CaptureReport()
        for p in passes:
            for r in p.records:
                report.called.add(r.name)
                if not p.finite:
                    report.nonfinite.add(r.name)
                elif self.fisher != "empirical" and r.reached and not p.tapped:
                    report.without_output.add(r.name)
        scale_now = (float(self.grad_scaler.get_scale()) if self.grad_scaler is not None
                     else 1.0)
        # a pass taken at another scale belongs to a step the scaler skipped
        done = [p for p in passes if p.backpropagated
                and (p is self._orphans or p.scale == scale_now)]
        if report.nonfinite:
            done = []  # the step's curvature update is skipped
        sizes = [self._size(p) for p in done] if self.fisher == "empirical" else []
        if self._size_check and self.loss_reduction != "sum" and len(set(sizes)) > 1:
            report.unequal_sizes = sizes
        parts: dict[str, tuple[list[Tensor], list[Tensor], list[int], list[int]]] = {}
        for p in done:
            for r in p.records:
                if not r.g or r.name not in self.layers:
                    continue
                a, g, samples, locations = parts.setdefault(r.name, ([], [], [], []))
                a.append(r.a)
                if self.fisher == "empirical":
                    mult = self._multiplier(r, p, sizes, scale_now)
                    g.extend(rows * mult for rows in r.g)
                else:
                    g.extend(r.g)
                samples.append(r.samples)
                locations.append(r.locations)
        out: dict[str, LayerStatistics] = {}
        for name, (a, g, samples, locations) in parts.items():
            helper, m = self.layers[name], sum(samples)
            out[name] = LayerStatistics(
                a=a[0] if len(a) == 1 else torch.cat(a),
                a_scale=helper.input_scale(m),
                g=g[0] if len(g) == 1 else torch.cat(g),
                g_scale=helper.output_grad_scale(m, locations[-1]),
                samples=m,
                a_diagonal=helper.diagonal_input,
            )
        report.complete = set(out)
        self.report = report
        self.clear()
        return out

    def _size(self, p: _Pass) -> int:
        """What ``loss_reduction`` divides the pass's loss by: its samples (``"batch_mean"``),
        its terms (``"mean"``) or 1 (``"sum"``)."""
        if self.loss_reduction == "sum":
            return 1
        if self.loss_reduction == "mean":
            if p.terms is None:
                name = p.records[0].name if p.records else "?"
                raise ValueError(
                    f"natgrad: loss_reduction='mean' needs the model output to count its terms, "
                    f"but layer {name!r} ran outside a forward of the model; use "
                    "loss_reduction='batch_mean' or 'sum'")
            return p.terms
        return p.samples if p.samples is not None else max(r.samples for r in p.records)

    def _multiplier(self, r: _Record, p: _Pass, sizes: list[int], scale: float) -> float:
        """From the gradient of the user's loss at the layer output to per-sample rows.

        The user's loss is ``Σ_i w_i · ℓ_i / s_i`` over the step's micro-batches ``i`` (``ℓ_i``
        the sum of the per-sample negative log-likelihoods, ``s_i`` :meth:`_size`), with
        ``w_i = 1/K`` (``accumulation="mean"``), ``1`` (``"sum"``) or ``s_i / Σ_j s_j``
        (``"full_batch"``); the rows of pass ``i`` are its gradient times ``s_i / w_i``."""
        mult = float(r.samples if self.loss_reduction == "batch_mean" else self._size(p))
        if self.accumulation == "mean":
            mult *= len(sizes)
        elif self.accumulation == "full_batch" and self.loss_reduction != "sum":
            mult *= sum(sizes) / self._size(p)  # (the layer's own sample count times N / n_i)
        return mult / (p.scale if p is not self._orphans else scale)

    def discard_backpropagated(self) -> None:
        """Forget the passes whose backward already ran (their gradients are being zeroed);
        forwards still waiting for their backward are kept."""
        keep = [p for p in self._passes if not p.backpropagated]
        for p in self._passes:
            if p.backpropagated:
                self._release(p)
        self._passes = keep
        if self._orphans is not None and self._orphans.backpropagated:
            self._release(self._orphans)
            self._orphans = None

    def clear(self) -> None:
        """Forget every recorded pass."""
        for p in self._all_passes():
            self._release(p)
        self._passes, self._orphans, self._current = [], None, None

    @staticmethod
    def _release(p: _Pass) -> None:
        if p.handle is not None:
            p.handle.remove()
            p.handle = None
        for r in p.records:
            if r.handle is not None:
                r.handle.remove()
                r.handle = None

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def remove(self) -> None:
        """Detach every hook from the model for good."""
        self._detach()
        self.clear()
        self._armed = False
        self._removed = True


#: the name the capture had before the curvature engine (``natgrad.capture.CurvatureCapture``)
CurvatureCapture = HookCapture
