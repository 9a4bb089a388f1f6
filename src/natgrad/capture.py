"""Collect K-FAC statistics from the user's ordinary forward and backward passes.

:class:`CurvatureCapture` attaches forward hooks to the preconditioned layers (and, for the
Monte-Carlo Fisher, to the model). While :attr:`CurvatureCapture.active` is true and the model runs
in training mode with gradients enabled, each forward pass records

* the layer's input rows ``ā`` (``LayerHelper.input_rows``), and
* the output gradients ``g = ∂(−log p(y|x)) / ∂s`` per sample:

  - ``fisher="mc"``: ``y`` is sampled from the model's predictive distribution and one extra
    backward to the layer outputs (not to the parameters) runs inside the forward pass, on
    curvature steps only;
  - ``fisher="exact"``: the expectation over ``y`` is taken in closed form (type-2 Fisher):
    with ``Bᵀ B = H`` the output-space Hessian, one backward per output coordinate ``c`` records
    the rows ``J_sᵀ Bᵀ e_c``, so ``Σ_c g_c g_cᵀ = J_sᵀ H J_s``. ``C`` extra backward passes: meant
    for tests, small outputs and analysis;
  - ``fisher="empirical"``: a tensor hook on each layer output reads the gradient of the user's own
    loss during ``loss.backward()``. The loss is assumed to be a *mean* over the batch, so the hook
    multiplies by the batch size to recover per-sample gradients (DESIGN §1).

Several forward/backward passes before one optimizer step (gradient accumulation) add up.
The user's model is never modified: no attributes are set on it, and its train/eval mode is read,
never changed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .layers import LayerHelper
from .likelihoods import Likelihood

try:  # the autograd edge of a tensor, immune to later in-place changes of the tensor (torch ≥ 2.2)
    from torch.autograd.graph import get_gradient_edge
except ImportError:  # pragma: no cover - older torch: protect the output with a copy instead
    get_gradient_edge = None

FISHER_TYPES = ("mc", "empirical", "exact")


@dataclass
class Statistics:
    """Kronecker statistics of one layer for one step: ``Â = a_scale·aᵀa``, ``Ĝ = g_scale·gᵀg``."""

    a: Tensor  # (n_a, d_A)
    a_scale: float
    g: Tensor  # (n_g, d_G)
    g_scale: float
    samples: int
    #: ``‖a‖_F²`` and ``‖g‖_F²`` once known (the optimizer's finiteness check computes them)
    a_sq: float | None = None
    g_sq: float | None = None


@dataclass
class _Buffer:
    a: list[Tensor] = field(default_factory=list)
    g: list[Tensor] = field(default_factory=list)
    samples: int = 0
    locations: int = 1


def _concat(rows: list[Tensor]) -> Tensor:
    """The rows of several forward/backward passes stacked (no copy for a single pass)."""
    return rows[0] if len(rows) == 1 else torch.cat(rows)


class CurvatureCapture:
    """Hooks on ``layers`` (name → helper) of ``model`` that collect :class:`Statistics`."""

    def __init__(
        self,
        model: nn.Module,
        layers: dict[str, LayerHelper],
        likelihood: Likelihood,
        fisher: str = "mc",
        generator: torch.Generator | None = None,
    ) -> None:
        if fisher not in FISHER_TYPES:
            raise ValueError(f"fisher={fisher!r} is not supported; accepted values: {FISHER_TYPES}")
        self.model = model
        self.layers = layers
        self.likelihood = likelihood
        self.fisher = fisher
        self.generator = generator
        self._buffers: dict[str, _Buffer] = {name: _Buffer() for name in layers}
        self._pending: dict[str, Any] = {}  # name -> output or its gradient edge
        self._handles: list[Any] = []
        self._active = False
        self._removed = False

    @property
    def active(self) -> bool:
        """Whether the next forward passes are captured. The hooks are attached only while
        active, so steps without a curvature update run the model exactly as without K-FAC."""
        return self._active

    @active.setter
    def active(self, value: bool) -> None:
        value = bool(value)
        if value and not self._handles and not self._removed:
            self._handles = [
                helper.module.register_forward_hook(self._layer_hook(name, helper))
                for name, helper in self.layers.items()
            ]
            if self.fisher in ("mc", "exact"):
                self._handles.append(self.model.register_forward_hook(self._model_hook))
        elif not value and self._handles:
            self._detach()
        self._active = value

    # ------------------------------------------------------------------ hooks
    def _layer_hook(self, name: str, helper: LayerHelper) -> Callable:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
            if not (self.active and module.training and torch.is_grad_enabled()):
                return None
            if not output.requires_grad:
                return None
            buf = self._buffers[name]
            x = inputs[0].detach()
            m = x.shape[0]
            buf.a.append(helper.input_rows(x))
            buf.samples += m
            buf.locations = helper.locations(output)
            if self.fisher != "empirical" and get_gradient_edge is not None:
                # the backward to the layer outputs targets this graph edge, which later in-place
                # ops (e.g. ReLU(inplace=True)) cannot redirect: no copy of the output needed
                self._pending[name] = get_gradient_edge(output)
                return None
            if self.fisher == "empirical":

                def grad_hook(grad: Tensor) -> None:
                    buf.g.append(helper.output_grad_rows(grad.detach() * m))

                output.register_hook(grad_hook)
            else:
                self._pending[name] = output
            # Later in-place ops (e.g. ReLU(inplace=True)) act on a copy, so ``output`` keeps the
            # version whose gradient we want.
            return output.clone()

        return hook

    def _model_hook(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        if not self._pending:
            return
        names = list(self._pending)
        outs = [self._pending.pop(n) for n in names]
        if not isinstance(output, Tensor) or not output.requires_grad:
            return
        if not bool(torch.isfinite(output.detach()).all()):
            # nothing sensible to sample from; the optimizer skips this step's gradient anyway
            for name in names:
                self._buffers[name] = _Buffer()
            return
        if self.fisher == "exact":
            flat = output.flatten(1)
            B = self.likelihood.hessian_sqrt(flat.detach())  # (m, C, C)
            objectives = [(B[:, c, :] * flat).sum() for c in range(flat.shape[1])]
        else:
            target = self.likelihood.sample(output, self.generator)
            objectives = [self.likelihood.nll(output, target).sum()]  # per-sample grads, no 1/m
        for objective in objectives:
            grads = torch.autograd.grad(objective, outs, retain_graph=True, allow_unused=True)
            for name, grad in zip(names, grads):
                if grad is not None:
                    rows = self.layers[name].output_grad_rows(grad.detach())
                    self._buffers[name].g.append(rows)

    # ------------------------------------------------------------------ API
    def collect(self) -> dict[str, Statistics]:
        """Statistics gathered since the last call, per layer (layers without both parts omitted).

        Clears the buffers.
        """
        out: dict[str, Statistics] = {}
        for name, buf in self._buffers.items():
            if buf.a and buf.g and buf.samples > 0:
                helper = self.layers[name]
                out[name] = Statistics(
                    a=_concat(buf.a),
                    a_scale=helper.input_scale(buf.samples),
                    g=_concat(buf.g),
                    g_scale=helper.output_grad_scale(buf.samples, buf.locations),
                    samples=buf.samples,
                )
        self.clear()
        return out

    def clear(self) -> None:
        for name in self._buffers:
            self._buffers[name] = _Buffer()
        self._pending.clear()

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def remove(self) -> None:
        """Detach every hook from the model for good."""
        self._detach()
        self._active = False
        self._removed = True
