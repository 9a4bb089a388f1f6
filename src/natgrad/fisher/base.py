"""One small base class for symmetric curvature operators on a model's flattened parameters.

An operator ``M`` of shape ``(P, P)`` acts on

* flat vectors ``(P,)`` → ``(P,)``,
* matrices ``(P, k)`` → ``(P, k)`` (columns are independent vectors), and
* lists of tensors shaped like the parameters → a list of the same shapes.

The flat order is the order of :attr:`LinearOperator.names` (the model's ``named_parameters``
order, restricted to the chosen parameters). Subclasses implement only :meth:`_matmat`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .._optional import require


class LinearOperator:
    """A symmetric linear operator over named parameter blocks.

    Args:
        names: parameter names, in flat order.
        shapes: their shapes.
        dtype, device: of the vectors the operator takes and returns.
    """

    def __init__(
        self,
        names: Sequence[str],
        shapes: Sequence[torch.Size],
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.names = list(names)
        self.shapes = [torch.Size(s) for s in shapes]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.offsets = [0]
        for s in self.sizes:
            self.offsets.append(self.offsets[-1] + s)
        self.dtype = dtype
        self.device = torch.device(device)

    # ------------------------------------------------------------------ shape
    @property
    def dim(self) -> int:
        """``P``: the number of parameters the operator acts on."""
        return self.offsets[-1]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    # ------------------------------------------------------------------ products
    def _matmat(self, V: Tensor) -> Tensor:
        """``M V`` for ``V`` of shape ``(P, k)``; returns ``(P, k)``."""
        raise NotImplementedError

    def __matmul__(self, x: Tensor | Sequence[Tensor]) -> Tensor | list[Tensor]:
        if isinstance(x, Tensor):
            if x.shape[0] != self.dim or x.ndim not in (1, 2):
                raise ValueError(f"expected a ({self.dim},) or ({self.dim}, k) tensor, got "
                                 f"{tuple(x.shape)}")
            V = x.to(self.dtype).reshape(self.dim, -1)
            out = self._matmat(V)
            return out.reshape(x.shape) if x.ndim == 1 else out
        return self.unflatten(self @ self.flatten(x))

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Tensors shaped like the parameters → one flat ``(P,)`` vector."""
        if len(tensors) != len(self.shapes):
            raise ValueError(f"expected {len(self.shapes)} tensors, got {len(tensors)}")
        for t, s, n in zip(tensors, self.shapes, self.names):
            if t.shape != s:
                raise ValueError(
                    f"tensor for {n!r} has shape {tuple(t.shape)}, expected {tuple(s)}")
        return torch.cat([t.reshape(-1).to(self.dtype) for t in tensors])

    def unflatten(self, v: Tensor) -> list[Tensor]:
        """A flat ``(P,)`` vector (or ``(P, k)``: leading ``k`` dim) → per-parameter tensors."""
        spans = zip(self.offsets, self.offsets[1:], self.shapes)
        if v.ndim == 1:
            return [v[a:b].reshape(s) for a, b, s in spans]
        return [v[a:b].T.reshape(v.shape[1], *s) for a, b, s in spans]

    # ------------------------------------------------------------------ algebra
    def __add__(self, other: LinearOperator) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        if other.shape != self.shape:
            raise ValueError(f"cannot add operators of shapes {self.shape} and {other.shape}")
        return SumOperator(self, other)

    def __sub__(self, other: LinearOperator) -> LinearOperator:
        return self + (-1.0) * other

    def __mul__(self, scalar: float) -> LinearOperator:
        if not isinstance(scalar, (int, float)):
            return NotImplemented
        return ScaledOperator(self, float(scalar))

    __rmul__ = __mul__

    def __neg__(self) -> LinearOperator:
        return ScaledOperator(self, -1.0)

    @property
    def T(self) -> LinearOperator:
        """The adjoint: the operator itself (curvature operators are symmetric)."""
        return self

    # ------------------------------------------------------------------ blocks
    def block_indices(self, name: str) -> list[int]:
        """Indices of the parameters called ``name`` or inside module ``name`` (``"0"`` →
        ``"0.weight"``, ``"0.bias"``); ``ValueError`` when none match."""
        idx = [i for i, n in enumerate(self.names) if n == name or n.startswith(name + ".")]
        if not idx:
            raise ValueError(f"no parameter of the operator matches {name!r}; known: {self.names}")
        return idx

    def block(self, name: str) -> LinearOperator:
        """The diagonal block of one layer (or parameter), ``(P_ℓ, P_ℓ)``."""
        return RestrictedOperator(self, self.block_indices(name))

    # ------------------------------------------------------------------ export
    def to_dense(self, max_dim: int = 8192) -> Tensor:
        """The dense ``(P, P)`` matrix (tests and tiny models only)."""
        if self.dim > max_dim:
            raise ValueError(f"refusing to form a dense {self.dim}×{self.dim} matrix "
                             f"(max_dim={max_dim})")
        return self._matmat(torch.eye(self.dim, dtype=self.dtype, device=self.device))

    def to_scipy(self):  # -> scipy.sparse.linalg.LinearOperator
        """A ``scipy.sparse.linalg.LinearOperator`` on float64 numpy arrays."""
        ScipyOperator = require("scipy.sparse.linalg", "to_scipy()").LinearOperator

        def matmat(X: np.ndarray) -> np.ndarray:
            V = torch.as_tensor(np.asarray(X, dtype=np.float64).reshape(self.dim, -1))
            out = self._matmat(V.to(device=self.device, dtype=self.dtype))
            return out.detach().cpu().double().numpy()

        return ScipyOperator(
            shape=self.shape, dtype=np.float64,
            matvec=lambda x: matmat(x).reshape(-1), rmatvec=lambda x: matmat(x).reshape(-1),
            matmat=matmat, rmatmat=matmat,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, dtype={self.dtype})"


class SumOperator(LinearOperator):
    """``M₁ + M₂``."""

    def __init__(self, a: LinearOperator, b: LinearOperator) -> None:
        super().__init__(a.names, a.shapes, a.dtype, a.device)
        self.a, self.b = a, b

    def _matmat(self, V: Tensor) -> Tensor:
        return self.a._matmat(V) + self.b._matmat(V.to(self.b.dtype)).to(self.dtype)


class ScaledOperator(LinearOperator):
    """``c · M``."""

    def __init__(self, op: LinearOperator, scale: float) -> None:
        super().__init__(op.names, op.shapes, op.dtype, op.device)
        self.op, self.scale = op, scale

    def _matmat(self, V: Tensor) -> Tensor:
        return self.scale * self.op._matmat(V)


class IdentityOperator(LinearOperator):
    """``I`` on the parameter blocks of ``like``: ``F + λ * IdentityOperator(F)`` is ``F + λI``."""

    def __init__(self, like: LinearOperator) -> None:
        super().__init__(like.names, like.shapes, like.dtype, like.device)

    def _matmat(self, V: Tensor) -> Tensor:
        return V


class RestrictedOperator(LinearOperator):
    """``Sᵀ M S``: ``M`` restricted to a subset of its parameter blocks (one full product each)."""

    def __init__(self, op: LinearOperator, indices: Sequence[int]) -> None:
        super().__init__([op.names[i] for i in indices], [op.shapes[i] for i in indices],
                         op.dtype, op.device)
        self.op = op
        self.rows = torch.cat([torch.arange(op.offsets[i], op.offsets[i + 1]) for i in indices])

    def _matmat(self, V: Tensor) -> Tensor:
        full = V.new_zeros(self.op.dim, V.shape[1])
        full[self.rows] = V
        return self.op._matmat(full)[self.rows]
