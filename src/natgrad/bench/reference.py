"""Float64 references for the analysis benchmark, independent of the code they judge.

For an ``nn.Sequential`` classifier built from Linear / Conv2d layers and parameter-free modules,
every quantity of the exact (type-2) Fisher ``F = (1/N) Σ_n J_nᵀ H_n J_n`` (cross-entropy:
``H_n = diag(p_n) − p_n p_nᵀ``) follows from, per layer ``ℓ`` and sample ``n``:

* the layer's input rows ``ā_{n,t}`` (``F.unfold`` patches plus a bias coordinate), and
* the Jacobian ``D_{n,t} = ∂f_n / ∂s_{n,t}`` ``(C, d_G)`` of the network output with respect to
  the layer's output at location ``t`` — ``torch.func.jacrev`` of the rest of the network,
  vmapped over samples,

since ``∂f_n/∂V_ℓ = Σ_t D_{n,t} ⊗ ā_{n,t}ᵀ``. No natgrad pull-back, row store or operator is
used, so this judges them. Everything is float64; the memory is ``N C Σ_ℓ T_ℓ d_{G,ℓ}`` (a few
hundred MB for the benchmark models at ``N = 1000``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import jacrev, vmap


@dataclass
class _Layer:
    module: nn.Module
    inputs: Tensor  # (N, T, d_A): bias coordinate last when the layer has one
    jac: Tensor  # (N, C, T, d_G)
    bias: bool

    @property
    def shape(self) -> tuple[int, int]:
        return self.jac.shape[3], self.inputs.shape[2]

    def split(self, M: Tensor) -> list[Tensor]:
        """``(…, d_G, d_A)`` → flat weight and bias parts (the parameters' layout)."""
        lead = M.shape[:-2]
        if not self.bias:
            return [M.reshape(*lead, -1)]
        return [M[..., :-1].reshape(*lead, -1), M[..., -1]]


def _patches(module: nn.Module, x: Tensor) -> Tensor:
    """``(N, T, d_A)`` input rows of a Linear / Conv2d (no bias coordinate yet)."""
    if isinstance(module, nn.Linear):
        return x.reshape(x.shape[0], -1, x.shape[-1])
    if not isinstance(module.padding, tuple) or module.groups != 1:
        raise ValueError("the reference handles Conv2d with numeric padding and groups=1")
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                    stride=module.stride)
    return cols.transpose(1, 2)


class SequentialReference:
    """The float64 reference of the exact Fisher of ``model`` (an ``nn.Sequential``) on ``X``
    with the cross-entropy likelihood; see the module docstring."""

    def __init__(self, model: nn.Sequential, X: Tensor, chunk: int = 100) -> None:
        model = copy.deepcopy(model).double().eval().requires_grad_(False)
        X = X.double()
        self.N = X.shape[0]
        names = [n for n, _ in model.named_parameters()]
        self.layers: list[_Layer] = []
        covered: list[str] = []
        with torch.no_grad():
            h = X
            acts = []
            for module in model:
                acts.append(h)
                h = module(h)
            out = h.flatten(1)
        p = torch.softmax(out, dim=1)
        self.H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        for i, module in enumerate(model):
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                if any(True for _ in module.parameters()):
                    raise ValueError(f"layer {i} ({type(module).__name__}) has parameters")
                continue
            covered += [f"{i}.{k}" for k, _ in module.named_parameters()]
            a = _patches(module, acts[i])
            bias = module.bias is not None
            if bias:
                a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2)
            with torch.no_grad():
                s = module(acts[i])
            tail = model[i + 1:]

            def g(si: Tensor, tail: nn.Module = tail) -> Tensor:
                return tail(si[None]).flatten(1)[0]

            parts = [vmap(jacrev(g))(s[c:c + chunk]) for c in range(0, self.N, chunk)]
            J = torch.cat(parts)  # (N, C, *s.shape[1:])
            C = J.shape[1]
            if isinstance(module, nn.Conv2d):
                J = J.reshape(self.N, C, s.shape[1], -1).transpose(2, 3)  # (N, C, T, d_G)
            else:
                J = J.reshape(self.N, C, -1, s.shape[-1])
            self.layers.append(_Layer(module, a, J, bias))
        if covered != names:
            raise ValueError("parameters outside Linear / Conv2d layers are not handled")
        self.dim = sum(p.numel() for p in model.parameters())

    def _per_sample(self, L: _Layer, s: slice) -> Tensor:
        """``∂f_n/∂V_ℓ`` for samples ``s``: ``(n, C, d_G, d_A)``."""
        return torch.einsum("nctg,nta->ncga", L.jac[s], L.inputs[s])

    def diagonal(self, chunk: int = 50) -> Tensor:
        """``diag F`` ``(P,)`` in ``model.parameters()`` order."""
        parts = []
        for L in self.layers:
            D = torch.zeros(L.shape, dtype=torch.float64)
            for c in range(0, self.N, chunk):
                s = slice(c, c + chunk)
                Jw = self._per_sample(L, s)
                HJ = torch.einsum("ncd,ndga->ncga", self.H[s], Jw)
                D += (Jw * HJ).sum((0, 1))
            parts += L.split(D / self.N)
        return torch.cat(parts)

    def matmat(self, V: Tensor) -> Tensor:
        """``F V`` for ``V (P, k)`` (float64), matrix-free from the per-layer Jacobians."""
        k = V.shape[1]
        mats, off = [], 0
        for L in self.layers:
            dg, da = L.shape
            n = dg * da
            W = V[off:off + (n - dg if L.bias else n)].T.reshape(k, dg, -1)
            if L.bias:
                W = torch.cat([W, V[off + n - dg:off + n].T.reshape(k, dg, 1)], dim=2)
            mats.append(W)
            off += n
        Jv = sum(_jv(L, M) for L, M in zip(self.layers, mats))
        u = torch.einsum("ncd,ndk->nck", self.H, Jv) / self.N
        out = []
        for L in self.layers:
            M = torch.einsum("nctg,nck,nta->kga", L.jac, u, L.inputs)
            out += [t.T for t in L.split(M)]
        return torch.cat(out)

    def top_eigenvalues(self, k: int, tol: float = 1e-12) -> Tensor:
        """The ``k`` largest eigenvalues (ARPACK on :meth:`matmat`, float64), descending."""
        from scipy.sparse.linalg import LinearOperator, eigsh

        def mv(x: np.ndarray) -> np.ndarray:
            v = torch.from_numpy(np.asarray(x, dtype=np.float64).reshape(self.dim, -1))
            return self.matmat(v).numpy()

        op = LinearOperator((self.dim, self.dim), matvec=mv, matmat=mv, dtype=np.float64)
        vals = eigsh(op, k=k, which="LA", tol=tol, return_eigenvectors=False)
        return torch.from_numpy(np.sort(vals)[::-1].copy())

    def trace(self) -> float:
        return float(self.diagonal().sum())

    def kfac_factors(self, convention: str = "expand") -> list[tuple[Tensor, Tensor]]:
        """Per layer ``(A, G)``, ``A = (1/N) Σ_{n,t} ā āᵀ`` (bias coordinate last) and

        * ``"expand"`` (natgrad, docs/DESIGN.md; KFC):
          ``G = (1/(N T)) Σ_{n,t} D_{n,t}ᵀ H_n D_{n,t}``;
        * ``"bias"`` (BackPACK's KFLR for convolutions): ``G = (1/N) Σ_n (Σ_t D_{n,t})ᵀ H_n
          (Σ_t D_{n,t})``, the exact GGN block of the bias (locations summed before the outer
          product); the same as ``"expand"`` when ``T = 1``.
        """
        out = []
        for L in self.layers:
            T = L.inputs.shape[1]
            A = torch.einsum("nta,ntb->ab", L.inputs, L.inputs) / self.N
            if convention == "expand":
                HD = torch.einsum("ncd,ndtg->nctg", self.H, L.jac)
                G = torch.einsum("nctg,ncth->gh", L.jac, HD) / (self.N * T)
            elif convention == "bias":
                S = L.jac.sum(2)  # (N, C, d_G)
                G = torch.einsum("ncg,ncd,ndh->gh", S, self.H, S) / self.N
            else:
                raise ValueError(f"unknown convention {convention!r}")
            out.append((A, G))
        return out


def _jv(L: _Layer, M: Tensor) -> Tensor:
    """``J_ℓ V_ℓ`` per sample: ``(N, C, k)`` for ``M (k, d_G, d_A)``."""
    s = torch.einsum("nta,kga->ntgk", L.inputs, M)  # V ā_{n,t}
    return torch.einsum("nctg,ntgk->nck", L.jac, s)
