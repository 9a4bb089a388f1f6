"""Adam in the Kronecker eigenbasis of K-FAC's factors (eigenvalue-corrected K-FAC with Adam's
running second moment; SOAP's update with K-FAC's activation / gradient factors).

K-FAC scales the rotated gradient ``Q_Gᵀ V Q_A`` of a layer by ``1 / (μ_G,i μ_A,j + λ)``, the
Kronecker product of the factors' eigenvalues, which is not the Fisher's diagonal in that basis
(George et al. 2018, EK-FAC): and its step length is then left to a KL-clip whose scale depends
on the gradient noise (docs/DESIGN.md, "Step size"). Here the basis comes from K-FAC's factors
(refreshed on K-FAC's schedule, ``inverse_every``) and the diagonal scaling from a running mean
of the squared rotated gradient, with Adam's momentum and bias correction (Vyas et al. 2024,
SOAP, which builds its basis from gradient outer products instead). Per preconditioned layer,
with ``V = [∇W | ∇b]`` (``d_G × d_A``) and the factors' bases ``U_G`` (``d_G × r_G``) and
``U_A`` (``d_A × r_A``)::

    C(X) = U_Gᵀ X U_A,   R(X) = X − U_G C(X) U_Aᵀ  (core and residual)
    m ← β₁ m + (1 − β₁) V                         (kept as C(m) and R(m))
    s ← β₂ s + (1 − β₂) C(V)²                      (``r_G × r_A``, in the eigenbasis)
    t ← β₂ t + (1 − β₂) R(V)²                      (``d_G × d_A``, original coordinates)
    Δ = U_G [C(m̂) / (√ŝ + ε)] U_Aᵀ + R(R(m̂) / (√t̂ + ε))
    W ← (1 − η wd) W − η Δ

(hats: Adam's bias corrections). The first moment is kept split, ``C(m)`` rotated and ``R(m)``
in the parameters' state, and split again when the bases change (``m`` itself is unchanged),
so a step rotates only the gradient and the result: four products with full bases.

With full bases (``eigh`` factors, or a diagonal factor such
as an embedding's token counts, whose basis is the identity) ``R = 0`` and this is Adam in the
eigenbasis ``Q_A ⊗ Q_G``. With the low-rank bases of the ``projected`` strategy the top
eigen-subspace gets the eigenbasis second moment and its complement (where the factors are a
scaled identity, so any basis is an eigenbasis) Adam's in the original coordinates. The
second moments are kept across basis refreshes (index ``i`` is the ``i``-th eigenvalue);
entries that a growing rank adds start from the current squared rotated gradient.

Parameters outside Kronecker blocks (e.g. LayerNorm's), of layers whose curvature is not ready
yet, and with no spectral or diagonal factors, take AdamW's step with the same moments.
``η`` has Adam's units; there is no KL-clip and no heavy-ball momentum (β₁ is the momentum);
weight decay is decoupled (AdamW's).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..blocks import KroneckerBlock
from .hyper import adam_moments

if TYPE_CHECKING:  # pragma: no cover
    from ..factors import KroneckerFactor
    from .kfac import KFAC


@dataclasses.dataclass(frozen=True)
class EigenAdamOptions:
    """Options of Adam in the Kronecker eigenbasis (``natgrad.KFAC(eigen_adam=...)``).

    Args:
        betas: ``(β₁, β₂)``, each in ``[0, 1)``. Default (0.9, 0.99). On ResNet-8 (MNIST,
            batch 128, lr 3e-3) β₂ = 0.95 let the validation loss jump between 0.05 and 0.26
            after 200 steps, while 0.99 kept it at 0.044–0.050 from 300 to 600 steps. On the
            character GPT the 2,000-step race gave the same result with either value (1.5×
            AdamW's time to its final loss). Over 400 steps 0.95 had been 0.015–0.04 ahead
            there. (0.9, 0.9) and (0.9, 0.999) were behind, and SOAP's (0.95, 0.95) was
            0.3 nats behind at 150 steps (docs/DISCUSSION.md, issue 25).
        eps: ε added to the root of the second moment (> 0).
    """

    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", adam_moments("eigen_adam", self.betas, self.eps))

    @classmethod
    def coerce(cls, value: Any) -> EigenAdamOptions | None:
        """``None`` / ``False`` (off), ``True`` (defaults), a dict of options, or options."""
        if value is None or value is False or isinstance(value, cls):
            return value or None
        if value is True:
            return cls()
        if isinstance(value, dict):
            unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ValueError(f"invalid eigen_adam options {sorted(unknown)}: accepted: "
                                 "['betas', 'eps']")
            return cls(**value)
        raise ValueError(f"invalid eigen_adam={value!r}: expected None, True, a dict of "
                         "{'betas', 'eps'} or natgrad.optim.EigenAdamOptions")


def factor_basis(factor: KroneckerFactor) -> Tensor | None:
    """The factor's eigenbasis ``U`` (``d × r``, orthonormal columns, eigenvalues descending);
    ``None`` for the identity (a diagonal factor). ``ValueError`` for a strategy that is not
    spectral."""
    if getattr(factor, "diagonal", False):
        return None
    if not getattr(factor, "spectral", False):
        raise ValueError(f"eigen_adam needs spectral factors ('eigh' or 'projected'), got the "
                         f"{factor.name!r} strategy")
    return factor.eigen()[0]


def _core(X: Tensor, UG: Tensor | None, UA: Tensor | None) -> Tensor:
    """``C(X) = U_Gᵀ X U_A`` (an identity basis leaves its side alone)."""
    if UG is not None:
        X = UG.T @ X
    return X @ UA if UA is not None else X


def _expand(C: Tensor, UG: Tensor | None, UA: Tensor | None) -> Tensor:
    """``U_G C U_Aᵀ``."""
    if UG is not None:
        C = UG @ C
    return C @ UA.T if UA is not None else C


def _full(U: Tensor | None) -> bool:
    return U is None or U.shape[1] == U.shape[0]


def _resized(s: Tensor | None, fresh: Tensor, b2: float, step: int) -> Tensor:
    """The stored core second moment fitted to the current ranks, before this step's update:
    overlapping entries kept, new ones set so that after the update their bias-corrected value
    is ``fresh`` (the current squared rotated gradient), i.e. to ``(1 − β₂^(step−1)) fresh``
    (zero at the first step, as Adam's)."""
    if s is not None and s.shape == fresh.shape:
        return s
    out = fresh.mul(1 - b2 ** (step - 1))
    if s is not None:
        r0, r1 = min(s.shape[0], out.shape[0]), min(s.shape[1], out.shape[1])
        out[:r0, :r1] = s[:r0, :r1]
    return out


def _moments(opt: KFAC) -> dict[int, tuple[Tensor, Tensor, int]]:
    """Every parameter with a gradient: ``id(p) → (m, t, step)``, its first and second moments
    in the original coordinates (of the whole gradient for AdamW's step, of the residual in a
    preconditioned layer) and its step count, advanced here."""
    out = {}
    for g in opt.param_groups:
        for p in g["params"]:
            if p.grad is None:
                continue
            state = opt.state[p]
            if "eigen_adam_exp_avg" not in state:
                state["eigen_adam_exp_avg"] = torch.zeros_like(p)
                state["eigen_adam_exp_avg_sq"] = torch.zeros_like(p)
                state["eigen_adam_step"] = 0
            state["eigen_adam_step"] += 1
            out[id(p)] = (state["eigen_adam_exp_avg"], state["eigen_adam_exp_avg_sq"],
                          state["eigen_adam_step"])
    return out


def record_bases(opt: KFAC) -> None:
    """Note the current bases of every ready Kronecker layer as those its rotated first moment is
    in (after a checkpoint is loaded: the bases and the moments were saved together)."""
    opt.eigen_adam_bases.clear()
    for name, block in opt.curvature.blocks.items():
        if isinstance(block, KroneckerBlock) and block.refreshed:
            opt.eigen_adam_bases[name] = (factor_basis(block.G), factor_basis(block.A))


def _split_first_moment(opt: KFAC, name: str, UG: Tensor | None, UA: Tensor | None,
                        dtype: torch.dtype) -> None:
    """Keep the layer's first moment ``M = U_G m_c U_Aᵀ + m_r`` in the current bases: its core
    ``m_c`` rotated, its residual ``m_r`` in the parameters' state. When the bases changed
    since the last step (a refresh) or the layer just became ready (``M`` is then all in the
    parameters' state), ``M`` is rebuilt and split again."""
    helper = opt.layers[name]
    state = opt.state[helper.params[0]]
    cache = opt.eigen_adam_bases
    old = cache.get(name)
    if "eigen_adam_core_avg" in state and (old is None or (old[0] is UG and old[1] is UA)):
        cache[name] = (UG, UA)  # unchanged (or just loaded from a checkpoint, in these bases)
        return
    m_r = [opt.state[p]["eigen_adam_exp_avg"] for p in helper.params]
    M = helper.grad_matrix(m_r).to(dtype)
    if "eigen_adam_core_avg" in state and old is not None:
        M = M + _expand(state["eigen_adam_core_avg"], *old)
    core = _core(M, UG, UA)
    state["eigen_adam_core_avg"] = core
    rest = M - _expand(core, UG, UA) if not (_full(UG) and _full(UA)) else torch.zeros_like(M)
    for t, new in zip(m_r, helper.split_matrix(rest)):
        t.copy_(new)
    cache[name] = (UG, UA)


def _layer_step(opt: KFAC, name: str, moments: dict[int, tuple[Tensor, Tensor, int]],
                options: EigenAdamOptions) -> list[Tensor] | None:
    """The layer's step ``Δ`` as tensors shaped like its parameters (``None``: take AdamW's)."""
    helper = opt.layers[name]
    block = opt.curvature.blocks[name]
    if not isinstance(block, KroneckerBlock) or not block.refreshed:
        return None
    if any(id(p) not in moments for p in helper.params):
        return None
    UA, UG = factor_basis(block.A), factor_basis(block.G)
    b1, b2 = options.betas
    step = moments[id(helper.params[0])][2]
    bias1, bias2 = 1 - b1 ** step, 1 - b2 ** step
    dtype = block.G.dtype
    _split_first_moment(opt, name, UG, UA, dtype)
    state = opt.state[helper.params[0]]
    V = helper.grad_matrix([p.grad for p in helper.params]).to(dtype)
    CV = _core(V, UG, UA)
    s = _resized(state.get("eigen_adam_core_sq"), CV.square(), b2, step)
    s.mul_(b2).addcmul_(CV, CV, value=1 - b2)
    state["eigen_adam_core_sq"] = s
    m_c = state["eigen_adam_core_avg"]
    m_c.mul_(b1).add_(CV, alpha=1 - b1)
    D = _expand(m_c / bias1 / s.div(bias2).sqrt_().add_(options.eps), UG, UA)
    if not (_full(UG) and _full(UA)):
        m_r = helper.grad_matrix([moments[id(p)][0] for p in helper.params]).to(dtype)
        T = helper.grad_matrix([moments[id(p)][1] for p in helper.params]).to(dtype)
        RV = V - _expand(CV, UG, UA)
        m_r.mul_(b1).add_(RV, alpha=1 - b1)
        T.mul_(b2).addcmul_(RV, RV, value=1 - b2)
        for i, (m_new, t_new) in enumerate(zip(helper.split_matrix(m_r),
                                                helper.split_matrix(T))):
            moments[id(helper.params[i])][0].copy_(m_new)
            moments[id(helper.params[i])][1].copy_(t_new)
        rest = m_r / bias1 / T.div(bias2).sqrt_().add_(options.eps)
        D += rest - _expand(_core(rest, UG, UA), UG, UA)
    return helper.split_matrix(D)


def eigen_adam_step(opt: KFAC, hp: dict[str, Any]) -> None:
    """One step (module docstring): ``p ← (1 − η wd) p − η Δ`` for every parameter."""
    options = opt.eigen_adam
    b1, b2 = options.betas
    moments = _moments(opt)
    steps: dict[int, Tensor] = {}
    if opt.precondition:
        for name, helper in opt.layers.items():
            layer = _layer_step(opt, name, moments, options)
            if layer is not None:
                for p, d in zip(helper.params, layer):
                    steps[id(p)] = d.to(p.dtype)
    for g, ghp in zip(opt.param_groups, hp["groups"]):
        for p in g["params"]:
            if id(p) not in moments:
                continue
            d = steps.get(id(p))
            if d is None:  # AdamW's step in the original coordinates
                m, t, k = moments[id(p)]
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                t.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                d = (m / (1 - b1 ** k)) / (t / (1 - b2 ** k)).sqrt_().add_(options.eps)
            if ghp["weight_decay"] != 0:
                p.mul_(1 - ghp["lr"] * ghp["weight_decay"])
            p.add_(d, alpha=-ghp["lr"])
