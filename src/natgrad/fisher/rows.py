"""A Fisher operator with its rows held in memory: ``F = (1/N) UᵀU``, ``U = [B_n J_n]_n``.

``U`` has ``N · R`` rows (``R`` rows of the output factor per sample, :mod:`natgrad.fisher.ggn`)
and ``P`` columns; it is stored per layer, in the cheapest exact form:

* **Kronecker rows** (Linear, ``T = 1``): the row ``(n, r)`` of the layer is ``g_{n,r} ⊗ ā_n``, so
  only ``A (N, d_A)`` and ``G (N, R, d_G)`` are kept; ``U_ℓ v = g_{n,r}ᵀ V ā_n`` and
  ``U_ℓᵀ u = Σ_n (Σ_r u_{n,r} g_{n,r}) ā_nᵀ`` are two matmuls each (``V = [W | b]`` of ``v``).
* **dense rows** (Conv2d, Linear with extra leading dims, and every parameter outside a
  recognised layer): the per-sample, per-row gradients ``(N, R, P_ℓ)``.

Every sample must have the same ``R`` (sequence outputs: one length for the exact Fisher, whose
``R = T · V``; ``ValueError`` otherwise). One pass builds it (one forward and ``R`` backward
passes per chunk to the layer outputs, :mod:`natgrad.fisher.pullback`, plus per-sample gradients
of the dense layers); afterwards a
product ``F V`` is ``Uᵀ (U V) / N`` — a few matmuls per layer, no pass through the network. For a
conv net this is an order of magnitude fewer flops than a ``jvp`` + ``vjp`` product (a conv layer
costs ``2 N R P_ℓ`` per column instead of about ``4 N T P_ℓ``), and ``(P, k)`` products are
single matmuls. The price is memory: :func:`row_bytes` estimates it before anything is built,
and :meth:`RowFisher.from_ggn` returns ``None`` when it exceeds the budget (keep using the
operator then).

The matrix is the operator's, exactly: products agree with
:class:`~natgrad.fisher.ggn.GGNOperator` products to rounding.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..curvature import StatisticSums
from .base import LinearOperator
from .layer_diagonal import LayerSlot, grad_matrix, input_matrix, recognised_layers
from .pullback import probe


@dataclass
class _Block:
    """Rows of some parameters: ``indices`` into the operator's names, ``cols`` the flat
    positions they occupy in a ``(P,)`` vector (block-local order = the indices' order)."""

    name: str
    indices: tuple[int, ...]
    cols: Tensor | slice

    def apply(self, V: Tensor) -> Tensor:  # (P_ℓ, k) -> (N, R, k)
        raise NotImplementedError

    def apply_t(self, u: Tensor) -> Tensor:  # (N, R, k) -> (P_ℓ, k)
        raise NotImplementedError

    def diagonal(self) -> Tensor:  # (P_ℓ,) sum over samples and rows
        raise NotImplementedError

    def dense_rows(self) -> Tensor:  # (N, R, P_ℓ)
        raise NotImplementedError

    def gram(self) -> Tensor:  # (P_ℓ, P_ℓ) float64: UᵀU of the block
        raise NotImplementedError

    def row_gram(self) -> Tensor:  # (N R, N R) in the rows' dtype: U Uᵀ of the block
        raise NotImplementedError


@dataclass
class _DenseBlock(_Block):
    U: Tensor  # (N, R, P_ℓ)

    def apply(self, V: Tensor) -> Tensor:
        N, R, P = self.U.shape
        return tall_matmul(self.U.reshape(N * R, P), V).reshape(N, R, -1)

    def apply_t(self, u: Tensor) -> Tensor:
        N, R, P = self.U.shape
        return tall_matmul_t(self.U.reshape(N * R, P), u.reshape(N * R, -1))

    def gram(self) -> Tensor:
        U = self.U.reshape(-1, self.U.shape[2]).double()
        return U.T @ U

    def row_gram(self) -> Tensor:
        U = self.U.reshape(-1, self.U.shape[2])
        return U @ U.T

    def diagonal(self) -> Tensor:
        step = max(1, (1 << 24) // max(1, self.U[0].numel()))  # no (N, R, P_ℓ) temporary
        return sum(self.U[s:s + step].pow(2).sum((0, 1)) for s in range(0, len(self.U), step))

    def dense_rows(self) -> Tensor:
        return self.U


@dataclass
class _KronBlock(_Block):
    """A Linear layer: ``[W | b]`` of shape ``(d_G, d_A)``; weight first, then bias."""

    A: Tensor  # (N, d_A)
    G: Tensor  # (N, R, d_G)
    bias: bool

    def _matrices(self, V: Tensor) -> Tensor:
        """``(P_ℓ, k)`` block-local columns → ``(k, d_G, d_A)``."""
        dg, da = self.G.shape[2], self.A.shape[1]
        k = V.shape[1]
        if not self.bias:
            return V.T.reshape(k, dg, da)
        w = V[:dg * (da - 1)].T.reshape(k, dg, da - 1)
        return torch.cat([w, V[dg * (da - 1):].T.reshape(k, dg, 1)], dim=2)

    def _columns(self, M: Tensor) -> Tensor:
        """Inverse of :meth:`_matrices`."""
        k = M.shape[0]
        if not self.bias:
            return M.reshape(k, -1).T
        return torch.cat([M[:, :, :-1].reshape(k, -1), M[:, :, -1]], dim=1).T

    def apply(self, V: Tensor) -> Tensor:
        AV = self.A @ self._matrices(V).transpose(1, 2)  # (k, N, d_G): V ā_n
        return torch.bmm(self.G, AV.permute(1, 2, 0))  # g_{n,r}ᵀ V ā_n (bmm: 4× einsum)

    def apply_t(self, u: Tensor) -> Tensor:
        Gu = torch.einsum("nrk,nrg->kgn", u, self.G)  # Σ_r u_{n,r} g_{n,r}
        return self._columns(Gu @ self.A)

    def diagonal(self) -> Tensor:
        D = self.G.pow(2).sum(1).T @ self.A.pow(2)  # (d_G, d_A)
        return self._columns(D[None])[:, 0]

    def gram(self) -> Tensor:
        """``UᵀU`` of this block ``(P_ℓ, P_ℓ)`` (float64) as ``Σ_n (G_nᵀG_n) ⊗ (ā_n ā_nᵀ)``:
        ``N`` outer products instead of ``N R`` rows."""
        N, R, dg = self.G.shape
        da = self.A.shape[1]
        out = torch.zeros(dg * dg, da * da, dtype=torch.float64, device=self.A.device)
        step = max(1, (1 << 24) // (dg * dg + da * da))
        for s in range(0, N, step):
            G, A = self.G[s:s + step].double(), self.A[s:s + step].double()
            S = torch.einsum("nrg,nrh->ngh", G, G).reshape(len(G), -1)
            T = (A[:, :, None] * A[:, None, :]).reshape(len(A), -1)
            out += S.T @ T
        M = out.reshape(dg, dg, da, da).permute(0, 2, 1, 3).reshape(dg * da, dg * da)
        perm = self._columns(torch.arange(dg * da, device=M.device).reshape(1, dg, da))[:, 0]
        return M[perm][:, perm]

    def row_gram(self) -> Tensor:
        """``U Uᵀ`` of this block ``(N R, N R)``: row ``(n, r)`` is ``g_{n,r} ⊗ ā_n``, so the
        entry is ``(g_{n,r} · g_{m,s}) (ā_n · ā_m)``: one ``(N R) × d_G`` Gram product and one
        ``N × d_A`` one, multiplied in place (no ``(N R, P_ℓ)`` rows formed)."""
        N, R, dg = self.G.shape
        S = self.G.reshape(N * R, dg) @ self.G.reshape(N * R, dg).T
        S.view(N, R, N, R).mul_((self.A @ self.A.T)[:, None, :, None])
        return S

    def dense_rows(self) -> Tensor:
        N, R, dg = self.G.shape
        M = self.G[:, :, :, None] * self.A[:, None, None, :]  # (N, R, d_G, d_A)
        return self._columns(M.reshape(N * R, dg, -1)).T.reshape(N, R, -1)


def tall_matmul(U: Tensor, V: Tensor) -> Tensor:
    """``U V`` for a tall ``U (n, P)`` and a few columns ``V (P, k)``: ``(n, k)``.

    For ``k > 1`` as ``(Vᵀ Uᵀ)ᵀ``: the BLAS ``gemm`` with the tall operand first packs (copies)
    it and ran slower than ``k`` separate matrix–vector products (measured, torch 2.13 / MKL,
    CPU, ``U`` 10⁴ × 1.8·10⁴, 1 and 2 threads: 3 columns 0.34–0.40 s against 0.18–0.23 s this
    way, one column 0.06 s). Same products, summed in the BLAS's order."""
    if V.shape[1] == 1:
        return U @ V
    return (V.T.contiguous() @ U.T).T


def tall_matmul_t(U: Tensor, u: Tensor) -> Tensor:
    """``Uᵀ u`` for a tall ``U (n, P)`` and ``u (n, k)``: ``(P, k)``, as ``(uᵀU)ᵀ`` (the BLAS
    kernel for a transposed tall operand, ``Uᵀu``, is ~8× slower for 2–10 columns)."""
    return (u.T @ U).T


def _plan(op: LinearOperator) -> tuple[int, dict[str, LayerSlot], set[str], list[int]]:
    """``(R, recognised layers, the Kronecker ones (T = 1 Linear), indices of the other
    parameters)``, from a forward pass on one sample."""
    slots = recognised_layers(op)
    x, y = next(op.chunks(chunk_size=1))
    out, _, shapes = probe(op.forward, {n: s.helper.module for n, s in slots.items()}, x)
    R = op.output_factor(out, y, 0).shape[1]
    kron = {n for n, s in slots.items() if s.helper.kind == "linear"
            and s.helper.locations(torch.empty(shapes[n], device="meta")) == 1}
    covered = {i for s in slots.values() for i in s.indices}
    return R, slots, kron, [i for i in range(len(op.names)) if i not in covered]


def row_bytes(op: LinearOperator) -> int:
    """Bytes :meth:`RowFisher.from_ggn` would hold for ``op`` (a
    :class:`~natgrad.fisher.ggn.GGNOperator`), without building anything."""
    R, slots, kron, rest = _plan(op)
    N, item = op.num_samples, torch.empty((), dtype=op.dtype).element_size()
    total = sum(op.sizes[i] for i in rest) * N * R
    for n, s in slots.items():
        h = s.helper
        total += N * (h.in_dim + R * h.out_dim) if n in kron else N * R * h.num_params
    return total * item


class RowFisher(LinearOperator):
    """``F = (1/N) UᵀU`` from rows held per layer (see the module docstring).

    Build it with :meth:`from_ggn`. Acts on the same parameters, in the same flat order, as
    the operator it was built from; :attr:`num_samples` and :attr:`rank_bound` are copied.
    """

    def __init__(self, like: LinearOperator, blocks: Sequence[_Block], num_samples: int,
                 rank_bound: int) -> None:
        super().__init__(like.names, like.shapes, like.dtype, like.device)
        self.blocks = list(blocks)
        self.num_samples = num_samples
        self.rank_bound = rank_bound

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_ggn(cls, op: LinearOperator, max_bytes: int | None = None,
                 memory_elements: int = 1 << 24, statistics: StatisticSums | None = None
                 ) -> RowFisher | None:
        """The rows of ``op`` (a :class:`~natgrad.fisher.ggn.GGNOperator`), or ``None`` when
        they need more than ``max_bytes`` (:func:`row_bytes`; ``None``: no limit).

        ``memory_elements`` bounds the per-sample gradients formed at once for dense layers.
        ``statistics``: also fed the pass's layer inputs and pulled-back rows (its layers must
        be among the recognised ones, :func:`~natgrad.fisher.layer_diagonal.recognised_layers`;
        the others get nothing), so that the K-FAC statistics of the same output directions
        cost no second pass (:func:`natgrad.fisher.kfac.rows_and_statistics`).
        """
        if max_bytes is not None and row_bytes(op) > max_bytes:
            return None
        R, slots, kron, rest = _plan(op)
        N = op.num_samples
        kw = {"dtype": op.dtype, "device": op.device}
        store: dict[str, tuple[Tensor, ...]] = {}
        for n, s in slots.items():
            h = s.helper
            store[n] = ((torch.empty(N, h.in_dim, **kw), torch.zeros(N, R, h.out_dim, **kw))
                        if n in kron else (torch.zeros(N, R, h.num_params, **kw),))
        n0 = 0
        for chunk in op.pullbacks({n: s.helper.module for n, s in slots.items()}):
            m = chunk.m
            A = {n: input_matrix(slots[n].helper, a) for n, a in chunk.inputs.items()}
            for n in kron & set(A):
                store[n][0][n0:n0 + m] = A[n][:, 0]
            if statistics is not None:
                statistics.add_inputs(m, chunk.inputs, {
                    n: torch.empty(shape, device="meta") for n, shape in chunk.shapes.items()})
            for r, grads in enumerate(chunk.rows):
                if r >= R:
                    raise _rows_vary(R)
                if statistics is not None:
                    statistics.add_direction(grads)
                for n, g in grads.items():
                    h = slots[n].helper
                    G = grad_matrix(h, g)
                    if n in kron:
                        store[n][1][n0:n0 + m, r] = G[:, 0]
                    else:
                        _per_sample_rows(G, A[n], h.has_bias, store[n][0][n0:n0 + m, r],
                                         memory_elements)
            n0 += m
        blocks: list[_Block] = []
        for n, s in slots.items():
            cols = _cols(op, s.indices)
            blocks.append(_KronBlock(n, s.indices, cols, *store[n], s.helper.has_bias)
                          if n in kron else _DenseBlock(n, s.indices, cols, *store[n]))
        if rest:
            sub = op.restrict([op.names[i] for i in rest])
            U = torch.cat(list(sub.sample_rows(memory_elements)))
            if U.shape[0] != N * R:
                raise _rows_vary(R)
            U = U.reshape(N, R, sub.dim)
            blocks.append(_DenseBlock("", tuple(rest), _cols(op, rest), U))
        return cls(op, blocks, N, op.rank_bound)

    @property
    def nbytes(self) -> int:
        """Bytes of the rows held (what :func:`row_bytes` predicts)."""
        return sum(t.numel() * t.element_size() for b in self.blocks
                   for t in b.__dict__.values() if isinstance(t, Tensor) and t.is_floating_point())

    # ------------------------------------------------------------------ products
    @property
    def rows_per_sample(self) -> int:
        """``R``: rows of the output factor per sample (``U`` has ``N · R`` rows)."""
        b = self.blocks[0]
        return (b.G if isinstance(b, _KronBlock) else b.U).shape[1]

    def apply_rows(self, V: Tensor) -> Tensor:
        """``U V`` for columns ``V (P, k)``: ``(N, R, k)``."""
        return sum(b.apply(V[b.cols]) for b in self.blocks)

    def apply_rows_t(self, u: Tensor) -> Tensor:
        """``Uᵀ u`` for ``u (N, R, k)``: ``(P, k)``."""
        out = torch.zeros(self.dim, u.shape[2], dtype=self.dtype, device=self.device)
        for b in self.blocks:
            out[b.cols] = b.apply_t(u)
        return out

    def row_gram(self) -> Tensor:
        """``U Uᵀ`` ``(N R, N R)`` in the rows' dtype, block by block (one block's Gram alive
        besides the sum): ``F = UᵀU / N`` and ``U Uᵀ / N`` have the same nonzero eigenvalues
        (:mod:`natgrad.fisher.dual`)."""
        total = None
        for b in self.blocks:
            S = b.row_gram()
            total = S if total is None else total.add_(S)
            del S
        return total

    def _matmat(self, V: Tensor) -> Tensor:
        return self.apply_rows_t(self.apply_rows(V)).div_(self.num_samples)  # in place

    def diagonal(self) -> Tensor:
        """The exact diagonal ``(P,)``."""
        out = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for b in self.blocks:
            out[b.cols] = b.diagonal() / self.num_samples
        return out

    def layer_traces(self) -> dict[str, float]:
        """``tr F_ℓℓ`` per recognised layer (by module name)."""
        return {b.name: float(b.diagonal().double().sum()) / self.num_samples
                for b in self.blocks if b.name}

    def gram(self, max_dim: int = 8192) -> Tensor:
        """The dense ``(P, P)`` matrix (small operators or blocks only)."""
        if self.dim > max_dim:
            raise ValueError(f"refusing to form a dense {self.dim}×{self.dim} matrix "
                             f"(max_dim={max_dim})")
        if len(self.blocks) == 1:
            return (self.blocks[0].gram() / self.num_samples).to(self.dtype)
        U = torch.zeros(self.blocks[0].dense_rows().shape[:2] + (self.dim,), dtype=self.dtype,
                        device=self.device)
        for b in self.blocks:
            U[:, :, b.cols] = b.dense_rows()
        U = U.reshape(-1, self.dim).double()
        return (U.T @ U / self.num_samples).to(self.dtype)

    # ------------------------------------------------------------------ blocks
    def restrict(self, names: Sequence[str]) -> RowFisher:
        """The diagonal block of the named parameters: a :class:`RowFisher` of the rows they
        own (a block they cover in part keeps the columns of their parameters only: e.g. one
        normalization layer's parameters out of the rows of every other parameter)."""
        unknown = [n for n in names if n not in self.names]
        if unknown or not names:
            raise ValueError(f"unknown or no parameter names {unknown}; known: {self.names}")
        wanted = {self.names.index(n) for n in names}
        order = sorted(wanted)
        sub = LinearOperator([self.names[i] for i in order], [self.shapes[i] for i in order],
                             self.dtype, self.device)
        local = {i: j for j, i in enumerate(order)}
        moved: list[_Block] = []
        for b in self.blocks:
            keep = [i for i in b.indices if i in wanted]
            if not keep:
                continue
            cols = _cols(sub, [local[i] for i in keep])
            if len(keep) == len(b.indices):
                moved.append(type(b)(**{**b.__dict__, "indices": tuple(local[i] for i in keep),
                                        "cols": cols}))
                continue
            starts = dict(zip(b.indices, itertools.accumulate(
                (self.sizes[i] for i in b.indices), initial=0)))
            pos = torch.cat([torch.arange(starts[i], starts[i] + self.sizes[i]) for i in keep])
            U = b.dense_rows()[:, :, pos.to(self.device)]
            moved.append(_DenseBlock(b.name, tuple(local[i] for i in keep), cols, U))
        return RowFisher(sub, moved, self.num_samples, self.rank_bound)

    def block(self, name: str) -> LinearOperator:
        return self.restrict([self.names[i] for i in self.block_indices(name)])


def _rows_vary(R: int) -> ValueError:
    return ValueError(
        f"RowFisher needs the same number of output-factor rows for every sample (R = {R} for "
        "the first one); the exact Fisher of sequences of several lengths has T·V rows per "
        "sample: multiply with the operator itself (natgrad.fisher.analysis.analyze: "
        "cache=False), or use one sequence length")


def _cols(op: LinearOperator, indices: Sequence[int]) -> Tensor | slice:
    """Flat positions of the parameters ``indices``: a slice when they are adjacent (no copy)."""
    if all(b == a + 1 for a, b in zip(indices, indices[1:])):
        return slice(op.offsets[indices[0]], op.offsets[indices[-1] + 1])
    return torch.cat([torch.arange(op.offsets[i], op.offsets[i + 1]) for i in indices]).to(
        op.device)


def _per_sample_rows(G: Tensor, A: Tensor, bias: bool, out: Tensor, memory_elements: int) -> None:
    """Write the flat per-sample gradients ``G_nᵀ A_n`` (weight, then bias) into ``out
    (m, P_ℓ)``; ``G (m, T, d_G)``, ``A (m, T, d_A)``."""
    m, _, dg = G.shape
    da = A.shape[2]
    sub = max(1, memory_elements // (dg * da))
    for s in range(0, m, sub):
        M = G[s:s + sub].transpose(1, 2) @ A[s:s + sub]  # (s, d_G, d_A)
        if bias:
            out[s:s + sub, :dg * (da - 1)] = M[:, :, :-1].reshape(M.shape[0], -1)
            out[s:s + sub, dg * (da - 1):] = M[:, :, -1]
        else:
            out[s:s + sub] = M.reshape(M.shape[0], -1)


def rows_summary(rows: RowFisher | None, jacobian_mode: str | None = "forward",
                 cache: bool = True) -> dict[str, object]:
    """How an analysis multiplies by ``F``: a JSON-ready line for its report (``jacobian_mode``
    and ``cache``: of the operator used when there are no rows)."""
    if rows is None:
        how = ("jvp + vjp per chunk" if jacobian_mode != "reverse" else
               "rows of B_n J_n per chunk from backward passes (no forward-mode AD)")
        why = "rows did not fit the memory budget" if cache else "cache=False"
        return {"method": f"{how} ({why})"}
    return {"method": "rows of B_n J_n in memory (RowFisher)", "bytes": rows.nbytes,
            "blocks": {b.name or "<other parameters>": type(b).__name__.strip("_")
                       for b in rows.blocks}}
