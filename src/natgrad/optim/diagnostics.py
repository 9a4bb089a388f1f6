"""What a curvature step did not capture, said by name (the optimizer warns; never silent).

On a curvature step every preconditioned layer whose parameters have a gradient should have
statistics. When one has none, the capture's report says why:

* it was a candidate layer (:mod:`natgrad.layers.registry`) whose first forward did not compute
  its helper's formula: it is taken out of preconditioning with that reason (the helper warned
  when it checked);

* its forward never ran through the module (its hook never fired) although its parameters got a
  gradient: the module is called functionally (``F.linear(x, layer.weight)``, attention's fused
  projections). On the first curvature step such a layer is taken out of preconditioning (it
  would never get curvature) and listed in the registration summary with that reason;
* the backward reached it but never the model output the Monte-Carlo / exact labels are drawn
  from: the forward did not go through the model given to the optimizer, or the loss is
  computed on another tensor (``output_key`` says where the logits are);
* its pass's logits were not finite (NaN / inf): no Monte-Carlo / exact labels can be drawn;
  the step's curvature update is skipped with one warning and no layer is dropped;
* anything else (e.g. its forward ran but that forward was not backpropagated).

It also says, once per optimizer, when the micro-batches of a step differ in size while
``accumulation`` was left at its default (the empirical Fisher then assumes ``"mean"``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..curvature import CaptureReport, LayerStatistics

if TYPE_CHECKING:  # pragma: no cover
    from .kfac import KFAC

FUNCTIONAL = "called functionally: its forward hook never ran although it got gradients"


def missing_statistics(opt: KFAC, stats: dict[str, LayerStatistics],
                       report: CaptureReport) -> list[str]:
    """Warnings for the layers with gradients but no statistics this step (see the module
    docstring); drops functionally-called layers on the first curvature step."""
    first = all(n == 0 for n in opt.curvature.updates.values())
    functional, no_output, other = [], [], []
    messages = []
    if report.nonfinite:
        opt.skipped_curvature_updates += 1
        messages.append(
            f"non-finite model output (logits) at step {opt.steps}: the {opt.fisher} Fisher's "
            f"output-gradient statistic G cannot be sampled from it; the curvature update of "
            f"this step is skipped for every layer (factors untouched, no layer dropped)")
    if report.unequal_sizes and not opt._warned_sizes:
        opt._warned_sizes = True
        messages.append(
            f"the micro-batches of step {opt.steps} differ in size {report.unequal_sizes}: the "
            "empirical Fisher assumes each micro-batch loss was divided by their number "
            "(accumulation='mean'); if you weight them by size (loss_i * n_i / N, the "
            "full-batch loss) pass accumulation='full_batch', and pass accumulation='mean' to "
            "confirm the division (warned once)")
    for name, helper in list(opt.layers.items()):
        if helper.refusal is not None:
            opt.curvature.drop_layer(name, helper.refusal)
            continue
        if name in stats or all(p.grad is None for p in helper.params):
            continue
        if name in report.nonfinite:
            continue
        if name in report.without_output:
            no_output.append(name)
        elif name not in report.called:
            functional.append(name)
        else:
            other.append(name)
    if functional:
        if first:
            for name in functional:
                opt.curvature.drop_layer(name, FUNCTIONAL)
            messages.append(f"layers {functional} are {FUNCTIONAL}; they take the plain step "
                            "(see registration_summary)")
        else:
            messages.append(f"layers {functional} got gradients but ran no recorded forward at "
                            f"step {opt.steps}; their curvature is not updated")
    if no_output:
        messages.append(
            f"the backward reached layers {no_output} but not the output of the model given to "
            f"natgrad.KFAC ({type(opt.curvature.model).__name__}), which the {opt.fisher} Fisher "
            "labels come from: the forward bypassed that model, or the loss is computed from "
            "another tensor than the one natgrad reads as the logits (output_key=... names it "
            "when the model returns a structure); no statistics this step")
    if other:
        messages.append(f"no curvature statistics for layers {other} at step {opt.steps} "
                        "(their recorded forwards were not backpropagated)")
    return messages
