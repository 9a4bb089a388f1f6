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
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor


class Likelihood(ABC):
    name: ClassVar[str]

    @abstractmethod
    def nll(self, output: Tensor, target: Tensor) -> Tensor:
        """Per-sample negative log-likelihood, ``(m,)`` from output ``(m, C)``."""

    @abstractmethod
    def sample(self, output: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A target ``ŷ ~ p(y | f)`` per sample (no gradient)."""

    @abstractmethod
    def hessian_sqrt(self, output: Tensor) -> Tensor:
        """``B`` with ``Bᵀ B = H``, batched: ``(m, C, C)`` (rows of ``B`` index 'directions')."""


class CrossEntropy(Likelihood):
    name = "cross_entropy"

    def nll(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output, target, reduction="none")

    def sample(self, output: Tensor, generator: torch.Generator | None = None) -> Tensor:
        probs = torch.softmax(output.detach(), dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    def hessian_sqrt(self, output: Tensor) -> Tensor:
        # B = diag(√p) − √p pᵀ  ⇒  BᵀB = diag(p) − p pᵀ  (uses Σp = 1)
        p = torch.softmax(output, dim=-1)
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
