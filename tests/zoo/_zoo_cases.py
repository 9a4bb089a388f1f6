"""The one case table of the zoo tests (``tests/zoo``) and the helpers they share: preparing a
model in float64, the dense ``torch.func`` Fisher, parameter indices, coverage.

Each :class:`Case` names a model of :data:`natgrad.models.zoo.ZOO` and what is expected of it;
``xfail`` marks, per test, the cases that fail today and why (strict: they turn into failures
when the fix is merged, and the mark goes). Since issue 24's fixes are merged, none is marked.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from natgrad.models.zoo import ZOO

f64 = torch.float64


@dataclass(frozen=True)
class Case:
    """One zoo model and what is expected of it.

    Attributes:
        name: key of :data:`natgrad.models.zoo.ZOO`.
        min_coverage: the preconditioned fraction of the parameters (by count) at least.
        plain: names of the parameters that may take the plain step (bare parameters outside
            any layer, e.g. a class token); the names end with one of these.
        exact_layers: layers (besides the norm layers) whose K-FAC block is the exact Fisher
            block on one datum: linear layers applied at one position (the classifier heads).
        rtol: tolerance of the exact quantities against the dense reference.
        xfail: test → reason, for the tests that fail today.
    """

    name: str
    min_coverage: float
    plain: tuple[str, ...] = ()
    exact_layers: tuple[str, ...] = ()
    rtol: float = 1e-10
    xfail: dict[str, str] = field(default_factory=dict)

    @property
    def spec(self):
        return ZOO[self.name]


CASES = [
    Case("mobilenet_like", 0.90, exact_layers=("classifier",)),
    Case("convnext_like", 0.95, plain=("gamma",), exact_layers=("head",)),
    Case("vit_like", 0.90, plain=("cls_token", "pos_embed"), exact_layers=("head",)),
    Case("resnet_inplace", 1.0, exact_layers=("fc",)),
    Case("gpt2", 0.95),
    Case("bert", 1.0, exact_layers=("bert.pooler.dense", "classifier")),
    # LlamaRMSNorm normalises in float32 whatever the model's dtype: the Jacobians carry float32
    # rounding (measured 1e-7 relative against the reference), so the exact quantities agree
    # to that
    Case("llama", 0.95, rtol=1e-6),
]


def cases(test: str, variants: tuple[str, ...] = (), output: str | None = None) -> list:
    """``pytest.param(case)`` per case (with that ``output`` kind if given), or
    ``pytest.param(case, variant)`` per case and variant, marked ``xfail(strict=True)`` where
    ``test`` (or ``"test[variant]"``) is a key of the case's ``xfail``."""
    out = []
    for case in CASES:
        if output is not None and case.spec.output != output:
            continue
        for v in variants or (None,):
            reason = case.xfail.get(test) or case.xfail.get(f"{test}[{v}]")
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            values = (case,) if v is None else (case, v)
            out.append(pytest.param(*values, id=case.name if v is None else f"{case.name}-{v}",
                                    marks=marks))
    return out


# ---------------------------------------------------------------- models and data
def build(case: Case, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """The case's model (``pytest.importorskip`` for transformers models), seeded, with the
    affine norm parameters and BatchNorm running statistics moved off their initial values
    (ones, zeros) so that no block is special; train mode."""
    if case.spec.transformers:
        pytest.importorskip("transformers")
    torch.manual_seed(seed)
    model = case.spec.build().to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.2, 0.2, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    return model.train()


def batch(case: Case, n: int, seed: int = 0, dtype: torch.dtype | None = None
          ) -> tuple[Tensor, Tensor]:
    return case.spec.batch(n, torch.Generator().manual_seed(seed), dtype)


def logits(out) -> Tensor:
    """The logits of a tensor or a ``ModelOutput``."""
    return out if isinstance(out, Tensor) else out.logits


def named_params(model: nn.Module) -> list[tuple[str, Tensor]]:
    """The trainable parameters in the operators' flat order (tied weights once)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def flat_indices(model: nn.Module, params: list[Tensor]) -> Tensor:
    """Positions of ``params``' entries in the flat vector of :func:`named_params`."""
    start, index = 0, {}
    for _, p in named_params(model):
        index[id(p)] = torch.arange(start, start + p.numel())
        start += p.numel()
    return torch.cat([index[id(p)] for p in params])


def norm_layers(model: nn.Module) -> list[str]:
    """The model's normalization layers with a learned scale (torch's, their subclasses, and
    RMSNorm classes such as transformers' ``LlamaRMSNorm``)."""
    kinds = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.RMSNorm)
    return [n for n, m in model.named_modules()
            if (isinstance(m, kinds) or type(m).__name__.endswith("RMSNorm"))
            and getattr(m, "weight", None) is not None]


def coverage(model: nn.Module, layers: dict) -> float:
    """The preconditioned fraction of the trainable parameters, by count."""
    covered = {id(p) for h in layers.values() for p in h.params}
    ps = [p for _, p in named_params(model)]
    return sum(p.numel() for p in ps if id(p) in covered) / sum(p.numel() for p in ps)


# ---------------------------------------------------------------- the dense reference
def dense_fisher(model: nn.Module, x: Tensor) -> Tensor:
    """``F = (1/N) Σ_n Σ_t J_ntᵀ (diag p_nt − p_nt p_ntᵀ) J_nt``: the categorical Fisher of the
    logits (per position for sequence logits ``(N, T, V)``), ``J`` by ``torch.func.jacrev``
    through ``functional_call`` (tied weights stay tied), ``(P, P)`` in :func:`named_params`
    order. The model's buffers are left alone (train-mode BatchNorm updates copies)."""
    names = [n for n, _ in named_params(model)]
    theta = [p.detach() for _, p in named_params(model)]
    buffers = dict(model.named_buffers())

    def f(*ps: Tensor) -> Tensor:
        copies = {n: b.clone() for n, b in buffers.items()}  # made inside the transform
        out = logits(functional_call(model, {**copies, **dict(zip(names, ps))}, (x,)))
        return out.reshape(out.shape[0], -1, out.shape[-1])  # (N, T, V), T = 1 for classes

    with torch.no_grad():
        out = f(*theta)
    with warnings.catch_warnings():  # vmap over SDPA falls back to a loop, and says so
        warnings.filterwarnings("ignore", message="There is a performance drop")
        jac = jacrev(f, argnums=tuple(range(len(theta))))(*theta)
    J = torch.cat([j.reshape(*out.shape, -1) for j in jac], dim=-1)  # (N, T, V, P)
    prob = out.softmax(-1)
    sJ = prob.sqrt().unsqueeze(-1) * J
    pJ = torch.einsum("ntv,ntvp->ntp", prob, J)
    F = torch.einsum("ntvp,ntvq->pq", sJ, sJ) - torch.einsum("ntp,ntq->pq", pJ, pJ)
    return F / x.shape[0]


def close(actual: Tensor, expected: Tensor, rtol: float) -> None:
    """``max |actual − expected| ≤ rtol · max |expected|``."""
    actual, expected = torch.as_tensor(actual, dtype=f64), torch.as_tensor(expected, dtype=f64)
    scale = float(expected.abs().max())
    err = float((actual - expected).abs().max())
    assert err <= rtol * scale, f"max error {err:.3e} > {rtol:g} × {scale:.3e}"
