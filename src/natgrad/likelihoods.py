"""Likelihoods behind the supported losses: sampling, negative log-likelihood, output Hessian.

Each loss kind is read as a probabilistic model ``p(y | f)`` of the network output ``f``:

=================  ===============================  ==========================================
kind               model                            output-space Hessian ``H`` of ``-log p``
=================  ===============================  ==========================================
``cross_entropy``  categorical, ``softmax(f)``       ``diag(p) − p pᵀ``
``mse``            Gaussian ``N(f, I)`` (unit var.)  ``I``
``bce``            independent ``Bernoulli(σ(f))``   ``diag(σ(f)(1 − σ(f)))``
=================  ===============================  ==========================================

Scale of ``mse``: the negative log-likelihood is ``½‖y − f‖²`` per sample. ``torch.nn.MSELoss()``
(mean over all ``m·C`` entries) is ``2/C`` times its batch mean; the Fisher here is the one of the
unit-variance Gaussian, whatever constant the training loss uses.

**Shapes: samples, positions, events.** An output ``f`` of shape ``(m, ...)`` is read as ``m``
samples, each made of ``P`` independent *positions* with an *event* of ``E`` entries each
(:meth:`Likelihood.events` gives the ``(m, P, E)`` view): for ``cross_entropy`` the last dim is the
categorical event and every other dim a position (sequence logits ``(B, T, V)``: ``P = T``,
``E = V``); ``mse`` and ``bce`` are elementwise (``E = 1``, every entry a position). A sample's
negative log-likelihood is the **sum over its positions** (the likelihood of a sequence is the
product over tokens), so the Fisher is per sample (per sequence), the convention of
docs/DESIGN.md.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor


class Likelihood(ABC):
    name: ClassVar[str]
    #: the event is the last dim (categorical) rather than one entry (elementwise likelihoods)
    categorical: ClassVar[bool] = False

    @abstractmethod
    def nll(self, output: Tensor, target: Tensor) -> Tensor:
        """Per-sample negative log-likelihood, ``(m,)`` from output ``(m, ...)`` (summed over
        positions)."""

    @abstractmethod
    def sample(self, output: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A target ``ŷ ~ p(y | f)`` per sample and position (no gradient)."""

    @abstractmethod
    def hessian_sqrt(self, output: Tensor) -> Tensor:
        """``B`` with ``Bᵀ B = H`` for outputs ``(m, C)`` flattened per sample: ``(m, C, C)``
        (rows of ``B`` index 'directions')."""

    @abstractmethod
    def event_hessian_sqrt(self, events: Tensor) -> Tensor:
        """``B`` with ``Bᵀ B = H`` per position, for events ``(..., E)``: ``(..., E, E)``."""

    def events(self, output: Tensor) -> Tensor:
        """The ``(m, P, E)`` view of an output ``(m, ...)`` (see the module docstring)."""
        if output.ndim < 2:
            raise ValueError(f"the output must have a batch dim and at least one more, got shape "
                             f"{tuple(output.shape)}")
        size = output.shape[-1] if self.categorical else 1
        return output.reshape(output.shape[0], -1, size)

    def positions(self, output: Tensor) -> int:
        """``P``: the independent positions (terms of the negative log-likelihood) per sample."""
        return int(self.events(output).shape[1])

    def nll_grad(self, output: Tensor, target: Tensor) -> Tensor:
        """``∇_f −log p(target | f)`` per sample and position, shaped like ``output``."""
        if target.is_floating_point():
            target = target.reshape(output.shape).to(output.dtype)
        with torch.enable_grad():
            o = output.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.nll(o, target).sum(), o)
        return g


class CrossEntropy(Likelihood):
    name = "cross_entropy"
    categorical = True

    def nll(self, output: Tensor, target: Tensor) -> Tensor:
        if output.ndim == 2:
            return F.cross_entropy(output, target, reduction="none")
        # positions: output (m, ..., C), target (m, ...)
        C = output.shape[-1]
        if tuple(target.shape) != tuple(output.shape[:-1]):
            raise ValueError(f"cross_entropy: a target of shape {tuple(output.shape[:-1])} is "
                             f"needed for outputs {tuple(output.shape)}, got "
                             f"{tuple(target.shape)}")
        per = F.cross_entropy(output.reshape(-1, C), target.reshape(-1), reduction="none")
        return per.reshape(output.shape[0], -1).sum(1)

    def sample(self, output: Tensor, generator: torch.Generator | None = None) -> Tensor:
        probs = torch.softmax(output.detach(), dim=-1)
        flat = probs.reshape(-1, probs.shape[-1])  # (m, C) stays (m, C): the same draws
        return torch.multinomial(flat, 1, generator=generator).reshape(output.shape[:-1])

    def hessian_sqrt(self, output: Tensor) -> Tensor:
        return self.event_hessian_sqrt(output)

    def event_hessian_sqrt(self, events: Tensor) -> Tensor:
        # B = diag(√p) − √p pᵀ  ⇒  BᵀB = diag(p) − p pᵀ  (uses Σp = 1)
        p = torch.softmax(events, dim=-1)
        s = p.sqrt()
        return torch.diag_embed(s) - s.unsqueeze(-1) * p.unsqueeze(-2)


class Gaussian(Likelihood):
    name = "mse"

    def nll(self, output: Tensor, target: Tensor) -> Tensor:
        return 0.5 * (output - target).pow(2).flatten(1).sum(1)

    def sample(self, output: Tensor, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(
            output.shape, generator=generator, dtype=output.dtype, device=output.device
        )
        return output.detach() + noise

    def hessian_sqrt(self, output: Tensor) -> Tensor:
        m, c = output.shape[0], output[0].numel()
        eye = torch.eye(c, dtype=output.dtype, device=output.device)
        return eye.expand(m, c, c)

    def event_hessian_sqrt(self, events: Tensor) -> Tensor:
        return torch.ones_like(events).unsqueeze(-1)


class Bernoulli(Likelihood):
    name = "bce"

    def nll(self, output: Tensor, target: Tensor) -> Tensor:
        nll = F.binary_cross_entropy_with_logits(output, target, reduction="none")
        return nll.flatten(1).sum(1)

    def sample(self, output: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return torch.bernoulli(torch.sigmoid(output.detach()), generator=generator)

    def hessian_sqrt(self, output: Tensor) -> Tensor:
        p = torch.sigmoid(output.flatten(1))
        return torch.diag_embed((p * (1 - p)).sqrt())

    def event_hessian_sqrt(self, events: Tensor) -> Tensor:
        p = torch.sigmoid(events)
        return (p * (1 - p)).sqrt().unsqueeze(-1)


LIKELIHOODS: dict[str, type[Likelihood]] = {
    cls.name: cls for cls in (CrossEntropy, Gaussian, Bernoulli)
}


ALIASES = {"bernoulli": "bce", "gaussian": "mse", "categorical": "cross_entropy"}


def get_likelihood(kind: str) -> Likelihood:
    """The likelihood for a loss kind; ``ValueError`` naming the accepted kinds otherwise."""
    kind = ALIASES.get(kind, kind)
    if kind not in LIKELIHOODS:
        raise ValueError(f"loss={kind!r} is not supported; accepted values: {sorted(LIKELIHOODS)}")
    return LIKELIHOODS[kind]()
