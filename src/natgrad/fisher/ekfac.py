"""Eigenvalue-corrected K-FAC (EK-FAC, George et al. 2018) as an operator with its inverse.

K-FAC approximates a layer's Fisher block by ``A ⊗ G``, whose eigenbasis is ``Q_A ⊗ Q_G`` (the
factors' eigenvectors) and whose eigenvalues are the products ``α_j γ_i``. EK-FAC keeps the
basis and replaces the eigenvalues by the **exact diagonal of the Fisher in that basis**:

    ``S_ij = (Q_A ⊗ Q_G)_{ij}ᵀ F (Q_A ⊗ Q_G)_{ij}
          = (1/N) Σ_n Σ_r (Q_Gᵀ G_{n,r}ᵀ A_n Q_A)_ij²``,

with ``A_n`` ``(T, d_A)`` the layer's input rows and ``G_{n,r}`` ``(T, d_G)`` row ``r`` of the
Fisher's output factor pulled back to the layer output (:mod:`natgrad.fisher.layer_diagonal`):
``G_{n,r}ᵀ A_n`` is the per-sample, per-row gradient of ``[W | b]``. The block is
``Q_G (S ∘ (Q_Gᵀ V Q_A)) Q_Aᵀ`` and its damped inverse ``Q_G ((Q_Gᵀ V Q_A) / (S + λ)) Q_Aᵀ``.
Of all matrices diagonal in that basis it is the closest to the block in Frobenius norm.

The rows come from one forward and ``R`` backward passes per chunk of the Fisher operator the
scalings are fitted to (exact: ``R = C``; MC: ``R = mc_samples``; empirical: ``R = 1``). The
bases come from a :class:`~natgrad.fisher.kfac.KFACOperator` (each factor's dense matrix is
eigendecomposed in float64; a projected factor's complement gets an arbitrary orthonormal basis,
in which the scalings are fitted all the same). EK-FAC covers the Kronecker blocks of Linear and
Conv2d layers; any other block of the K-FAC operator is kept as it is (:attr:`EKFACOperator.
kfac_layers`), parameters outside every block get a zero block.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..blocks import KroneckerBlock
from .base import LinearOperator
from .ggn import GGNOperator
from .inverse import KFACInverse, check_damping, layer_map
from .kfac import KFACOperator
from .layer_diagonal import grad_matrix, input_matrix, per_sample_sq_sum, recognised_layers

__all__ = ["EKFACInverse", "EKFACOperator", "eigenbasis_scalings"]


def eigenbasis_scalings(fisher: GGNOperator, bases: dict[str, tuple[Tensor, Tensor]],
                        memory_elements: int = 1 << 24) -> dict[str, Tensor]:
    """``S`` ``(d_G, d_A)`` per layer: the diagonal of ``fisher``'s block in the basis
    ``Q_A ⊗ Q_G`` (see the module docstring).

    Args:
        fisher: the Fisher operator whose rows are pulled back.
        bases: layer name → ``(Q_A (d_A, d_A), Q_G (d_G, d_G))``; every name must be a Linear or
            Conv2d layer the operator recognises.
    """
    slots = recognised_layers(fisher)
    missing = sorted(set(bases) - set(slots))
    if missing:
        raise ValueError(f"layers {missing} are not Linear/Conv2d layers whose rows the operator "
                         "can pull back")
    helpers = {n: slots[n].helper for n in bases}
    sums = {n: torch.zeros(Q_G.shape[0], Q_A.shape[0], dtype=torch.float64)
            for n, (Q_A, Q_G) in bases.items()}
    for chunk in fisher.pullbacks({n: h.module for n, h in helpers.items()}):
        A = {n: input_matrix(helpers[n], a) @ bases[n][0].to(a.dtype)
             for n, a in chunk.inputs.items() if n in helpers}
        for grads in chunk.rows:
            for n, g in grads.items():
                if n in A:
                    G = grad_matrix(helpers[n], g) @ bases[n][1].to(g.dtype)
                    sums[n] += per_sample_sq_sum(G, A[n], memory_elements).double()
    return {n: s / fisher.num_samples for n, s in sums.items()}


class EKFACOperator(LinearOperator):
    """``blockdiag(Q_G (S_ℓ ∘ (Q_Gᵀ · Q_A)) Q_Aᵀ)`` over the EK-FAC layers (module docstring).

    Args:
        kfac: the K-FAC operator giving the layers, their bases and any block kept as K-FAC.
        bases: layer name → ``(Q_A, Q_G)`` orthogonal matrices.
        scalings: layer name → ``S`` ``(d_G, d_A)``.
    """

    def __init__(self, kfac: KFACOperator, bases: dict[str, tuple[Tensor, Tensor]],
                 scalings: dict[str, Tensor]) -> None:
        if set(bases) != set(scalings) or not set(bases) <= set(kfac.layers):
            raise ValueError("bases and scalings must name the same layers of the K-FAC operator")
        super().__init__(kfac.names, kfac.shapes, kfac.dtype, kfac.device)
        self.kfac = kfac
        self.bases = {n: (QA.to(self.dtype), QG.to(self.dtype)) for n, (QA, QG) in bases.items()}
        self.scalings = {n: S.to(self.dtype) for n, S in scalings.items()}
        for n, S in self.scalings.items():
            QA, QG = self.bases[n]
            if S.shape != (QG.shape[0], QA.shape[0]):
                raise ValueError(f"scalings of {n!r} have shape {tuple(S.shape)}, expected "
                                 f"{(QG.shape[0], QA.shape[0])}")
        #: layers of the K-FAC operator kept as K-FAC blocks (not Kronecker, or not pulled back)
        self.kfac_layers = [n for n in kfac.layers if n not in self.scalings]

    @classmethod
    def from_fisher(cls, fisher: GGNOperator, kfac: KFACOperator | None = None,
                    memory_elements: int = 1 << 24) -> EKFACOperator:
        """Scalings fitted to ``fisher``'s rows in the eigenbasis of ``kfac``'s factors.

        Args:
            fisher: an :class:`~natgrad.fisher.ExactFisher`, :class:`~natgrad.fisher.MCFisher`
                or :class:`~natgrad.fisher.EmpiricalFisher` on the same parameters as ``kfac``.
            kfac: the K-FAC operator giving the bases (default: fresh ``eigh`` factors of the
                same kind of Fisher from ``fisher``'s data, :meth:`KFACOperator.from_data`).
        """
        if kfac is None:
            kfac = KFACOperator.from_data(
                fisher.model, fisher.data, fisher.loss, fisher.fisher,
                chunk_size=fisher.chunk_size, mc_samples=getattr(fisher, "mc_samples", 1),
                seed=getattr(fisher, "seed", 0), output_key=fisher.output_key)
        if kfac.names != fisher.names:
            raise ValueError("the Fisher and the K-FAC operator must act on the same parameters "
                             f"in the same order; got {fisher.names} and {kfac.names}")
        slots = recognised_layers(fisher)
        bases = {}
        for name, block in kfac.blocks.items():
            if isinstance(block, KroneckerBlock) and name in slots:
                bases[name] = (_eigenvectors(block.A), _eigenvectors(block.G))
        return cls(kfac, bases, eigenbasis_scalings(fisher, bases, memory_elements))

    def _apply_layer(self, name: str, M: Tensor) -> Tensor:
        if name not in self.scalings:
            block = self.kfac.blocks[name]
            return block.matvec(M.to(block.factors[0].dtype))
        QA, QG = self.bases[name]
        return QG @ ((QG.T @ M @ QA) * self.scalings[name]) @ QA.T

    def _matmat(self, V: Tensor) -> Tensor:
        return layer_map(self.kfac, V, self._apply_layer, 0.0)

    def inverse(self, damping: float, damping_mode: str = "exact") -> EKFACInverse:
        """``(E + λ I)⁻¹`` (:class:`EKFACInverse`); ``damping_mode`` applies to the layers kept
        as K-FAC."""
        return EKFACInverse(self, damping, damping_mode)

    def diagonal(self) -> Tensor:
        """``(P,)``: ``diag(Q_G (S ∘ ·) Q_Aᵀ)_ij = Σ_ab Q_G[i,a]² S_ab Q_A[j,b]²`` per EK-FAC
        layer, the K-FAC diagonal for the other blocks, zero elsewhere."""
        out = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for name, helper in self.kfac.layers.items():
            if name in self.scalings:
                QA, QG = self.bases[name]
                D = QG.pow(2) @ self.scalings[name] @ QA.pow(2).T
            else:
                D = self.kfac.blocks[name].diagonal()
            for i, t in zip(self.kfac._index[name], helper.split_matrix(D.to(self.dtype))):
                out[self.offsets[i]:self.offsets[i + 1]] = t.reshape(-1)
        return out


class EKFACInverse(LinearOperator):
    """``(E + λ I)⁻¹`` for an :class:`EKFACOperator`: ``Q_G ((Q_Gᵀ V Q_A) / (S + λ)) Q_Aᵀ`` per
    EK-FAC layer, :class:`~natgrad.fisher.inverse.KFACInverse` for the layers kept as K-FAC,
    ``v / λ`` elsewhere."""

    def __init__(self, op: EKFACOperator, damping: float, damping_mode: str = "exact") -> None:
        self.damping = check_damping(damping)
        super().__init__(op.names, op.shapes, op.dtype, op.device)
        self.op = op
        self._kfac = KFACInverse(op.kfac, damping, damping_mode)

    def _solve_layer(self, name: str, M: Tensor) -> Tensor:
        if name not in self.op.scalings:
            return self._kfac.solve_layer(name, M)
        QA, QG = self.op.bases[name]
        return QG @ ((QG.T @ M @ QA) / (self.op.scalings[name] + self.damping)) @ QA.T

    def _matmat(self, V: Tensor) -> Tensor:
        return layer_map(self.op.kfac, V, self._solve_layer, 1.0 / self.damping)


def _eigenvectors(factor: Any) -> Tensor:
    """Orthonormal eigenvectors ``(d, d)`` of a factor's dense matrix (float64)."""
    if getattr(factor, "diagonal", False):
        return torch.eye(factor.dim, dtype=torch.float64, device=factor.device)
    return torch.linalg.eigh(factor.to_dense().double())[1]
