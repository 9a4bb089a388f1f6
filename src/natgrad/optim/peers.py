"""The optimizers practitioners pick instead of natural gradient, as natgrad's registry builds
them: Muon on the hidden matrices with AdamW on the rest (:class:`MuonWithAdamW`), and SOAP,
Shampoo and PSGD-Kron from the optional ``pytorch-optimizer`` package (``natgrad[peers]``).

Each default below is the one its authors or a public benchmark publish; the comments say where
it comes from. They are starting points for a tuning budget (``natgrad race``), not tuned values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .._optional import require
from .preconditioned import load_together

#: Muon's published settings (K. Jordan, github.com/KellerJordan/Muon, README "Usage": hidden
#: weights lr 0.02, weight decay 0.01; momentum 0.95 with Nesterov and 5 Newton–Schulz steps,
#: the values it calls "typically work well"); torch.optim.Muon implements the same update
#: (its default ``adjust_lr_fn=None`` is that README's shape scaling).
MUON = {"momentum": 0.95, "nesterov": True, "ns_steps": 5, "weight_decay": 0.01}
#: the AdamW beside Muon, from the same README: lr 3e-4, betas (0.9, 0.95), weight decay 0.01
MUON_ADAMW = {"lr": 3e-4, "betas": (0.9, 0.95), "weight_decay": 0.01}


def hidden_matrices(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(hidden, rest)``: the weights of the model's ``nn.Linear`` layers except the last one
    (the output head) — the matrices Muon is meant for — and every other trainable parameter
    (embeddings, the head, norms, biases, convolutions: torch's Muon takes 2-D matrices only)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    hidden = [m.weight for m in linears[:-1] if m.weight.requires_grad]
    ids = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return hidden, rest


class MuonWithAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` on the hidden matrices and ``torch.optim.AdamW`` on the rest, as one
    optimizer: one ``step()``, ``zero_grad()``, ``state_dict()``.

    torch's Muon runs its Newton–Schulz iterations in bfloat16, which is fast on GPUs but slow
    on CPUs: on the 2-core development machine a step of the default character GPT took
    ~820 ms against AdamW's ~150 ms (one thread). ``newton_schulz_float32=True`` runs the same
    iteration in float32 (:func:`newton_schulz_float32`; ~1.1× AdamW's step there); the
    registry's ``muon`` does so for models on the CPU, so that a race measures Muon's method,
    not bfloat16 arithmetic emulated on a CPU.

    ``param_groups`` are Muon's groups followed by AdamW's (the same dicts), so an LR scheduler
    scales both learning rates; ``state`` merges both parts' states.

    Args:
        model: the network; its parameters are split by :func:`hidden_matrices`.
        lr: Muon's learning rate.
        adamw_lr: AdamW's learning rate for the other parameters.
        muon, adamw: further keyword arguments of each part (override :data:`MUON`,
            :data:`MUON_ADAMW`).
        newton_schulz_float32: run the Newton–Schulz iteration in float32 instead of torch's
            bfloat16 (the same update up to rounding).

    Raises:
        ValueError: the model has no hidden ``nn.Linear`` matrix for Muon.
    """

    def __init__(self, model: nn.Module, lr: float = 0.02, adamw_lr: float = MUON_ADAMW["lr"],
                 muon: dict[str, Any] | None = None, adamw: dict[str, Any] | None = None,
                 newton_schulz_float32: bool = False) -> None:
        if not isinstance(newton_schulz_float32, bool):
            raise ValueError(f"invalid newton_schulz_float32={newton_schulz_float32!r}: "
                             "expected True or False")
        self.newton_schulz_float32 = newton_schulz_float32
        hidden, rest = hidden_matrices(model)
        if not hidden:
            raise ValueError(f"{type(model).__name__} has no hidden nn.Linear matrix for Muon "
                             "(torch.optim.Muon takes 2-D matrices only; the output head and "
                             "embeddings go to AdamW)")
        self.muon = torch.optim.Muon(hidden, lr=lr, **{**MUON, **(muon or {})})
        adamw_kw = {**MUON_ADAMW, "lr": adamw_lr, **(adamw or {})}
        self.adamw = torch.optim.AdamW(rest, **adamw_kw) if rest else None
        super().__init__([torch.zeros(1, requires_grad=True)], {})
        self._share()

    @property
    def parts(self) -> list[torch.optim.Optimizer]:
        """The optimizers that take the step: Muon, then AdamW (when it has parameters)."""
        return [self.muon] + ([self.adamw] if self.adamw is not None else [])

    def _share(self) -> None:
        self.param_groups = [g for o in self.parts for g in o.param_groups]
        self.defaults = self.muon.defaults
        self.state = self.muon.state  # type: ignore[assignment]
        if self.adamw is not None:
            self.state = {**self.muon.state, **self.adamw.state}  # type: ignore[assignment]

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with _float32_newton_schulz(self.newton_schulz_float32):
            self.muon.step()
        if self.adamw is not None:
            self.adamw.step()
        self._share()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts:
            opt.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"muon": self.muon.state_dict(),
                "adamw": self.adamw.state_dict() if self.adamw is not None else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        if not isinstance(state_dict, dict) or set(state_dict) != {"muon", "adamw"}:
            raise ValueError("state_dict must hold 'muon' and 'adamw'")
        try:
            load_together(self.muon, state_dict["muon"], self.adamw, state_dict["adamw"])
        finally:
            self._share()

    def __repr__(self) -> str:
        n = sum(p.numel() for g in self.muon.param_groups for p in g["params"])
        return f"MuonWithAdamW(Muon on {n:,} hidden-matrix parameters, AdamW on the rest)"


def newton_schulz_float32(grad: torch.Tensor, ns_coefficients: tuple[float, float, float],
                          ns_steps: int, eps: float) -> torch.Tensor:
    """Muon's quintic Newton–Schulz orthogonalisation (Jordan et al.) in float32: ``X ← X / ‖X‖_F``
    of the wide orientation of ``grad`` (``(m, n)``, ``m ≤ n`` after a transpose), then
    ``ns_steps`` times ``X ← a X + (b S + c S²) X`` with ``S = X Xᵀ``; the result has ``grad``'s
    shape (and float32)."""
    a, b, c = ns_coefficients
    tall = grad.shape[0] > grad.shape[1]
    X = grad.float().T if tall else grad.float()
    X = X / X.norm().clamp(min=eps)
    for _ in range(ns_steps):
        S = X @ X.T
        X = a * X + torch.addmm(S, S, S, beta=b, alpha=c) @ X
    return X.T if tall else X


@contextlib.contextmanager
def _float32_newton_schulz(on: bool) -> Iterator[None]:
    """While active (``on``), torch's Muon orthogonalises with :func:`newton_schulz_float32`."""
    if not on:
        yield
        return
    import torch.optim._muon as muon_module

    saved = muon_module._zeropower_via_newtonschulz
    muon_module._zeropower_via_newtonschulz = newton_schulz_float32
    try:
        yield
    finally:
        muon_module._zeropower_via_newtonschulz = saved


def pytorch_optimizer(name: str) -> type[torch.optim.Optimizer]:
    """The class ``name`` of the optional ``pytorch-optimizer`` package; ``MissingExtraError``
    naming ``pip install 'natgrad[peers]'`` when it is not installed."""
    return getattr(require("pytorch_optimizer", f"the {name} optimizer"), name)


#: SOAP's published settings (Vyas et al. 2024, "SOAP: Improving and Stabilizing Shampoo using
#: Adam", reference code github.com/nikhilvyas/SOAP: lr 3e-3, betas (0.95, 0.95), weight decay
#: 0.01, preconditioner refreshed every 10 steps; pytorch-optimizer's defaults are the same)
SOAP = {"betas": (0.95, 0.95), "weight_decay": 0.01, "precondition_frequency": 10}
#: Shampoo as run in the modded-nanogpt optimizer comparison (K. Jordan et al.,
#: records/102924_Optimizers: Meta's DistributedShampoo with lr 0.0018, betas (0.95, 0.95),
#: precondition_frequency 10, Adam grafting with beta2 0.95, no weight decay), mapped onto
#: pytorch-optimizer's ScalableShampoo (Anil et al. 2020) — its RMSProp grafting (with the first
#: beta as momentum) is the Adam grafting; its other settings are the package's defaults.
SHAMPOO = {"betas": (0.95, 0.95), "preconditioning_compute_steps": 10, "graft_type": 3,
           "weight_decay": 0.0}
#: PSGD-Kron's settings (X.-L. Li's PSGD, as packaged in E. Walters' kron_torch, README "Basic
#: hyperparameters": momentum 0.9, no weight decay, a learning rate "like Adam's", 1e-3 being
#: pytorch-optimizer's default; the preconditioner-update probability schedule is the default)
KRON = {"momentum": 0.9, "weight_decay": 0.0}
