"""Lanczos with full reorthogonalisation: top-``k`` eigenpairs and the tridiagonalisation behind
stochastic Lanczos quadrature (:mod:`natgrad.fisher.slq`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import LinearOperator
from .results import Eigenpairs


def _basis_dtype(op: LinearOperator) -> torch.dtype:
    return torch.float64 if op.dtype == torch.float64 else torch.float32


def tridiagonalize(
    op: LinearOperator, V0: Tensor, steps: int, keep_basis: bool = False,
    reorthogonalize: bool = True,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``b`` independent Lanczos runs in parallel (one ``(P, b)`` product per step).

    ``reorthogonalize`` (default): full reorthogonalisation (two Gram–Schmidt passes) against
    each run's own basis, which is kept, ``b · steps`` vectors of ``P``. A run that breaks down
    (``β ≈ 0``: invariant subspace found) keeps ``β = 0`` from then on.

    ``reorthogonalize=False``: the three-term recurrence alone, two vectors per run alive
    (``q_{j−1}``, ``q_j``) besides the product, whatever ``steps``. In floating point the basis
    loses orthogonality once Ritz values converge and the tridiagonal then repeats converged
    eigenvalues ("ghosts"), but its Gauss quadrature stays the quadrature of the probe's
    spectral measure to rounding (Greenbaum 1989; Knizhnerman 1996): what stochastic Lanczos
    quadrature uses (:func:`natgrad.fisher.slq.quadrature`, ``reorthogonalize=False``). A run
    that breaks down continues from a fresh random vector with ``β = 0`` (its later nodes get
    zero weight).

    Args:
        V0: ``(P, b)`` start vectors (normalised here).
        steps: ``m``, Lanczos steps.
        keep_basis: also return the bases ``(b, m, P)`` (only with ``reorthogonalize``).

    Returns:
        ``alpha (b, m)``, ``beta (b, m − 1)`` (float64) and the bases or ``None``.
    """
    if not reorthogonalize:
        if keep_basis:
            raise ValueError("keep_basis needs reorthogonalize=True (no basis is kept without)")
        return _three_term(op, V0, steps)
    P, b = V0.shape
    steps = min(steps, P)
    dt = _basis_dtype(op)
    Q = torch.zeros(b, steps, P, dtype=dt, device=op.device)
    alpha = torch.zeros(b, steps, dtype=torch.float64)
    beta = torch.zeros(b, max(steps - 1, 0), dtype=torch.float64)
    q = (V0 / V0.norm(dim=0, keepdim=True)).to(dt).T.contiguous()  # (b, P)
    alive = torch.ones(b, dtype=torch.bool)
    for j in range(steps):
        Q[:, j] = q
        w = (op @ q.T.to(op.dtype)).T.to(dt)  # (b, P)
        alpha[:, j] = (w * q).sum(1).double()
        w = _reorthogonalize(Q[:, : j + 1], w)  # full reorthogonalisation against q_0..q_j
        if j == steps - 1:
            break
        nrm = w.norm(dim=1).double()
        scale = alpha[:, : j + 1].abs().max(1).values.clamp_min(1e-300)
        alive &= nrm > 1e-10 * scale
        beta[:, j] = torch.where(alive, nrm, torch.zeros_like(nrm))
        if not bool(alive.all()):  # restart dead runs orthogonally
            fresh = _reorthogonalize(Q[:, : j + 1], torch.randn(b, P, dtype=dt, device=op.device))
            w = torch.where(alive[:, None], w, fresh)
        q = w / w.norm(dim=1, keepdim=True)
    return alpha, beta, (Q if keep_basis else None)


def _three_term(op: LinearOperator, V0: Tensor, steps: int) -> tuple[Tensor, Tensor, None]:
    """:func:`tridiagonalize` without reorthogonalisation: ``w = F q_j − β_{j−1} q_{j−1}``,
    ``α_j = q_jᵀ w``, ``w −= α_j q_j``, ``β_j = ‖w‖``; ``q_{j−1}``, ``q_j`` and ``w`` per run."""
    P, b = V0.shape
    dt = _basis_dtype(op)
    alpha = torch.zeros(b, steps, dtype=torch.float64)
    beta = torch.zeros(b, max(steps - 1, 0), dtype=torch.float64)
    q = V0.T.to(dt).contiguous()  # (b, P)
    q.div_(_row_norms(q)[:, None].to(dt))
    prev = None
    for j in range(steps):
        w = (op @ q.T.to(op.dtype)).T.to(dt)  # (b, P)
        if prev is not None:
            w -= beta[:, j - 1, None].to(dt) * prev
        a = torch.tensor([_dot(wi, qi) for wi, qi in zip(w, q)], dtype=torch.float64)
        alpha[:, j] = a
        w -= a[:, None].to(dt) * q
        if j == steps - 1:
            break
        nrm = _row_norms(w)
        scale = alpha[:, : j + 1].abs().max(1).values.clamp_min(1e-300)
        dead = nrm <= 1e-10 * scale
        beta[:, j] = torch.where(dead, torch.zeros_like(scale), nrm)
        if bool(dead.any()):  # a fresh random direction, decoupled by β = 0
            w[dead] = torch.randn(int(dead.sum()), P, dtype=dt, device=op.device)
            nrm = _row_norms(w)
        prev, q = q, w.div_(nrm[:, None].to(dt))
        del w
    return alpha, beta, None


def _row_norms(W: Tensor) -> Tensor:
    """``‖w_i‖`` of the rows of ``W (b, P)``, summed in float64 slice by slice."""
    return torch.tensor([math.sqrt(_dot(w, w)) for w in W], dtype=torch.float64)


def _reorthogonalize(Q: Tensor, w: Tensor) -> Tensor:
    """Two classical Gram–Schmidt passes of each run's ``w (b, P)`` against its basis
    ``Q (b, j, P)``: one matrix–vector pair per run (the batched ``einsum`` it replaces was
    ~5× slower for ``P`` in the 10⁵s, measured with torch 2.13 on CPU)."""
    out = []
    for Qi, wi in zip(Q, w):
        for _ in range(2):
            wi = wi - (Qi @ wi) @ Qi
        out.append(wi)
    return torch.stack(out)


def _basis_block(P: int) -> int:
    """Elements per slice of the blocked basis operations (a slice of ``w`` stays in cache)."""
    return min(P, 1 << 18)


def _orthogonalize(Q: list[Tensor], w: Tensor) -> Tensor:
    """Two classical Gram–Schmidt passes of ``w (P,)`` against the orthonormal vectors ``Q``,
    in place, slice by slice (an ``(m, slice)`` temporary, never ``(m, P)``); returns the
    coefficients ``Qᵀ w`` (float64, both passes summed)."""
    P, blk = w.numel(), _basis_block(w.numel())
    h = torch.zeros(len(Q), dtype=torch.float64)
    for _ in range(2):
        if blk == P and w.dtype == torch.float64:  # one slice: an unblocked basis' products
            Qs = torch.stack(Q)
            c = Qs @ w
            w -= Qs.T @ c
            h += c
            continue
        # the coefficients summed in float64 whatever the basis: with float32 sums over slices
        # of 2^18 the top eigenvalues of a float32 operator came out ~1e-5 too large
        c = torch.zeros(len(Q), dtype=torch.float64)
        for a in range(0, P, blk):
            c += torch.stack([q[a:a + blk] for q in Q]).double() @ w[a:a + blk].double()
        for a in range(0, P, blk):
            w[a:a + blk] -= torch.stack([q[a:a + blk] for q in Q]).T @ c.to(w.dtype)
        h += c
    return h


def _rotate(Q: list[Tensor], Y: Tensor) -> list[Tensor]:
    """``Q ← Q Y`` in place for ``Y (m, l)``, ``l ≤ m``: the first ``l`` vectors become the
    combinations, the others are dropped (one ``(m, slice)`` temporary at a time)."""
    P, blk = Q[0].numel(), _basis_block(Q[0].numel())
    Yt = Y.T.to(Q[0].dtype)
    for a in range(0, P, blk):
        new = Yt @ torch.stack([q[a:a + blk] for q in Q])
        for i in range(Y.shape[1]):
            Q[i][a:a + blk] = new[i]
    return Q[:Y.shape[1]]


def _dot(u: Tensor, v: Tensor) -> float:
    """``uᵀv`` summed in float64, slice by slice (no float64 copy of the vectors)."""
    blk = _basis_block(u.numel())
    return sum(float(torch.dot(u[a:a + blk].double(), v[a:a + blk].double()))
               for a in range(0, u.numel(), blk))


def _norm(w: Tensor) -> float:
    """``‖w‖``: torch's for float64, summed in float64 slice by slice for float32 (whose
    float32 sum was 2e-5 off for 6·10⁵ entries)."""
    return float(w.norm()) if w.dtype == torch.float64 else math.sqrt(_dot(w, w))


def _residual(fv: Tensor, v: Tensor, theta: float) -> float:
    """``‖f v − θ v‖`` in float64, slice by slice."""
    blk = _basis_block(v.numel())
    return math.sqrt(sum(float((fv[a:a + blk].double() - theta * v[a:a + blk].double())
                               .pow(2).sum()) for a in range(0, v.numel(), blk)))


def _t(values: list[float]) -> Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _projection(H: Tensor, m: int, restarted: bool, alphas: list[float], betas: list[float]
                ) -> Tensor:
    """``QᵀFQ`` of the current basis: before any restart the Lanczos tridiagonal (``α``, ``β``;
    its other entries are rounding), after one the arrowhead-plus-tridiagonal ``H``."""
    if restarted:
        return H[:m, :m]
    a, b = _t(alphas[:m]), _t(betas[:m - 1])
    return torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1)


def lanczos_topk(
    op: LinearOperator,
    k: int = 10,
    max_steps: int | None = None,
    tol: float = 1e-3,
    seed: int = 0,
    check_every: int = 5,
    min_steps: int = 0,
    max_basis: int | None = None,
    basis_dtype: torch.dtype = torch.float64,
) -> Eigenpairs:
    """The ``k`` largest eigenpairs of a symmetric operator, with a bounded basis.

    Thick-restart Lanczos (Wu & Simon 2000) with full reorthogonalisation: the basis grows to
    ``max_basis`` vectors (e.g. ``2k + 8``; ``None``, the default: no restart, plain Lanczos
    with a basis of up to ``max_steps`` vectors), then keeps the ``k + (m − k) // 2`` Ritz
    vectors of the largest Ritz values and the residual direction and grows again. ``Q`` stays
    orthonormal, ``F Q = Q H + β q eᵀ`` with ``H = QᵀFQ`` (an arrowhead plus tridiagonal
    matrix after a restart), so the Ritz residual estimates ``|β s_{m,i}| / |θ_i|`` are as
    without restarts. It stops when the estimates of the top ``k`` fall below ``tol / 10`` (or
    after ``max_steps`` products, default ``max(4k, 60)`` without restarts and ``max(8k, 120)``
    with), then measures the true relative
    residuals ``‖F v − θ v‖ / |θ|`` with ``k`` one-column products. ``converged`` means every
    true residual ``≤ tol``.

    Memory: at most ``max(max_basis + 1, min_steps + 1, 2k)`` vectors of ``P`` in
    ``basis_dtype`` (the operator's products, one column at a time, come on top): the Ritz
    vectors are made in place in the basis, the rest of it is let go, then they are copied
    one by one into the ``(P, k)`` result. ``basis_dtype`` float64 (default) puts the rounding
    of the basis below a float32 operator's own (eigenvalues of a float32 operator came out
    ~7e-7 off, relative, with a float32 basis and ~5e-8 with a float64 one); float32 halves
    the memory.

    ``min_steps``: the first cycle runs at least that many steps without restart (unless the
    Krylov space is exhausted), e.g. to reuse its tridiagonal (``alpha``, ``beta``: the first
    cycle's, from the Gaussian start vector) as an SLQ probe of that many steps.
    """
    P = op.dim
    k = min(k, P)
    if max_basis is None:  # no restart: the basis grows with the run, as plain Lanczos
        max_steps = min(P, max(max_steps or max(4 * k, 60), min_steps))
        cap = max_steps
    else:
        if max_basis < min(k + 2, P):
            raise ValueError(f"max_basis must be at least k + 2 = {k + 2} (or P), got "
                             f"{max_basis}")
        cap = min(P, max_basis)
        max_steps = max(max_steps or max(8 * k, 120), min(min_steps, P))
    first_len = min(P, max(cap, min_steps))
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(P, generator=gen, dtype=torch.float64).to(device=op.device,
                                                               dtype=basis_dtype)
    Q = [q.div_(_norm(q))]
    del q
    H = torch.zeros(first_len + 1, first_len + 1, dtype=torch.float64)
    alphas: list[float] = []
    betas: list[float] = []
    first: tuple[Tensor, Tensor] | None = None
    restarted, products, smallest = False, 0, math.inf
    while True:
        j = len(Q) - 1
        w = (op @ Q[j].to(op.dtype)).to(basis_dtype)
        products += 1
        alpha = _dot(w, Q[j])
        h = _orthogonalize(Q, w)
        H[:j + 1, j] = h
        H[j, :j + 1] = h
        if not restarted:  # a plain Lanczos run so far: its tridiagonal (α_j = q_jᵀ F q_j)
            alphas.append(alpha)
        m = j + 1
        # norms and dot products summed in float64: torch's float32 norm of 6·10⁵ entries was
        # 2e-5 off, and the top eigenvalues of a float32 basis by as much
        nrm = _norm(w)
        scale = float(H.diagonal()[:m].abs().max())
        exhausted = nrm < 1e-12 * max(scale, 1e-300)
        full = m >= (cap if restarted else first_len)
        check = m >= k and (restarted or m >= min_steps) and (
            products % check_every == 0 or full or exhausted or products >= max_steps
            or m == min_steps)
        theta = S = None
        if check or full:
            theta, S = torch.linalg.eigh(_projection(H, m, restarted, alphas, betas))
            smallest = min(smallest, float(theta.min()))
        if check:
            top = theta.flip(0)[:k]
            est = nrm * S[-1].flip(0)[:k].abs() / top.abs().clamp_min(1e-300)
            if bool((est <= tol / 10).all()):
                break
        if exhausted or products >= max_steps:
            break
        if not restarted:
            betas.append(nrm)
        if full:  # thick restart: keep the top Ritz vectors and the residual direction
            if not restarted:
                first = _t(alphas), _t(betas[:m - 1])
            keep = min(m - 1, k + (min(m, cap) - k) // 2)
            order = torch.argsort(theta, descending=True)[:keep]
            Q = _rotate(Q, S[:, order])
            s = nrm * S[-1, order]
            H = torch.zeros(cap + 1, cap + 1, dtype=torch.float64)
            H[range(keep), range(keep)] = theta[order]
            H[keep, :keep] = s
            H[:keep, keep] = s
            restarted = True
        Q.append(w.div_(nrm))
    if first is None:
        first = _t(alphas), _t(betas[:m - 1])
    if theta is None:
        theta, S = torch.linalg.eigh(_projection(H, m, restarted, alphas, betas))
        smallest = min(smallest, float(theta.min()))
    order = torch.argsort(theta, descending=True)[:k]
    values = theta[order]
    del w
    Q = _rotate(Q[:m], S[:, order])
    vectors = torch.empty(P, k, dtype=op.dtype, device=op.device)
    res = torch.zeros(k, dtype=torch.float64)
    for i in range(k):  # one column at a time: no (P, k) product alive
        v, Q[i] = Q[i], Q[i].new_empty(0)  # the list lets go of the vector
        res[i] = _residual(op @ v.to(op.dtype), v, float(values[i]))
        vectors[:, i] = v
        del v
    rel = res / values.abs().clamp_min(1e-300)
    return Eigenpairs(values=values, vectors=vectors, residuals=rel,
                      converged=bool((rel <= tol).all()), steps=products + k, tol=tol,
                      smallest_ritz=smallest, alpha=first[0], beta=first[1])


def condition_number(
    top: Eigenpairs, damping: float, smallest: float | None = None
) -> float:
    """``(λ_max + λ) / (λ_min + λ)`` of the damped operator.

    ``smallest``: a value or bound for ``λ_min`` (``0`` for a rank-deficient Fisher, e.g. when
    ``N·C < P``); default the smallest Ritz value of the run, an *upper* bound on ``λ_min``, which
    makes the result a lower bound on the condition number.
    """
    lam_min = top.smallest_ritz if smallest is None else smallest
    lam_min = max(lam_min, 0.0)
    return (float(top.values[0]) + damping) / (lam_min + damping) if lam_min + damping > 0 \
        else math.inf
