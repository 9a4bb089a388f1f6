"""How cheap can pkfac with the curvature refreshed every step be on this machine?

docs/DISCUSSION.md (part 2) argues that the every-step target (≤ 2.0× SGD's step on the
784-1024-1024-10 MLP) sits at the floor of the algorithm on a 2-core CPU. This script backs that
with three measurements, taken side by side in one process:

1. **straight line**: the arithmetic of one every-step pkfac step (rank 24, a sketch of 12 new
   directions, Monte-Carlo Fisher, exact Kronecker damping, KL-clip) written as one flat function
   with no library structure: no hooks beyond what the statistics need, no finiteness checks, no
   per-layer bookkeeping, and a Rayleigh–Ritz through the Cholesky factor of the basis' Gram matrix
   (one orthogonalisation pass fewer than the library). It is *not* a usable optimizer — it only
   prices the work — and it is timed against ``torch.optim.SGD`` and against the library's
   ``pkfac`` with ``curvature_every=1, inverse_every=1`` (as is, with the empirical Fisher, which
   needs no extra backward, and with a sketch of 4 new directions instead of 12), all taking
   turns;
2. **small kernels**: the cost of the small operations the step is made of — the ``eigh`` of a
   36 × 36 matrix in every way torch, NumPy and SciPy offer, the two orientations of the sketch
   product ``Xᵀ Ω``, and the dispatch cost of a trivial operation;
3. with ``--compile``: the straight-line refresh core under ``torch.compile`` against eager.

Usage::

    python benchmarks/every_step_floor.py [--steps 70] [--repeats 3] [--threads 2] [--compile]
                                          [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from natgrad.data import load_dataset
from natgrad.models import build_model
from natgrad.optim import make_optimizer
from natgrad.report import format_table

RANK, SKETCH, DECAY, DAMPING, LR, KL_CLIP = 24, 12, 0.8, 1e-3, 0.1, 1e-3
#: the library variants (optimizer name, options); the straight line runs beside them
EVERY_STEP = {"curvature_every": 1, "inverse_every": 1}
LIBRARY: dict[str, tuple[str, dict[str, Any]]] = {
    "sgd": ("sgd", {}),
    "pkfac (library), curvature every step": ("pkfac", EVERY_STEP),
    # what two levers are worth: the Monte-Carlo backward (the empirical Fisher needs none, but it
    # is not a Fisher in general), and the sketch size (k = 4 new directions instead of 12)
    "pkfac (library), every step, fisher=empirical": ("pkfac", {**EVERY_STEP,
                                                                "fisher": "empirical"}),
    "pkfac (library), every step, sketch k=4": ("pkfac", {
        **EVERY_STEP, "factor_options": {"rank": RANK, "sketch_size": 4}}),
}


def median_time(fn: Callable[[], Any], repeats: int = 300, warmup: int = 20) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --------------------------------------------------------------------------- straight line
class LowRankFactor:
    """``U diag(λ) Uᵀ + σ (I − U Uᵀ)`` with its tracked trace (plain attributes)."""

    def __init__(self, dim: int, gen: torch.Generator) -> None:
        self.dim = dim
        self.U = torch.linalg.qr(torch.randn(dim, RANK, generator=gen))[0]
        self.lam = torch.linspace(1.0, 0.1, RANK)
        self.sigma = 0.01
        self.trace = 1.0


def refresh_core(rows: list[Tensor], bases: list[Tensor], omegas: list[Tensor], lam: Tensor,
                 sigma: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Rayleigh–Ritz refresh of ``b`` factors at once, tensors only.

    Args:
        rows: ``b`` statistics blocks ``(n, d_i)``.
        bases: ``b`` orthonormal ``(d_i, r)``.
        omegas: ``b`` Gaussian ``(n, k)``.
        lam: ``(b, r)`` float64; sigma: ``(b, 1, 1)`` float64; weight: ``(b, 1, 1)`` float64.

    Returns:
        the new bases zero-padded to ``(b, max d, r)`` and eigenvalues ``(b, r)`` (float64).
    """
    b, n, r = len(rows), rows[0].shape[0], bases[0].shape[1]
    width = max(x.shape[1] for x in rows)
    Z = rows[0].new_zeros(b, width, r + omegas[0].shape[1])
    for i, (x, U, omega) in enumerate(zip(rows, bases, omegas)):
        Z[i, : x.shape[1], :r] = U
        Z[i, : x.shape[1], r:] = (omega.T @ x).T
    Uz, Y = Z[:, :, :r], Z[:, :, r:]
    Y.baddbmm_(Uz, Uz.mT @ Y, alpha=-1.0)
    gram = (Z.mT @ Z).double()
    B = Z.new_empty(b, n, Z.shape[2])
    for i, x in enumerate(rows):
        torch.mm(x, Z[i, : x.shape[1]], out=B[i])
    M = (B.mT @ B).double().mul_(weight)
    P = gram[:, :, :r]  # Zᵀ U: the old basis in the new coordinates
    M += DECAY * ((P * (lam.unsqueeze(1) - sigma)) @ P.mT + sigma * gram)
    L = torch.linalg.cholesky(gram)
    C = torch.linalg.solve_triangular(
        L, torch.linalg.solve_triangular(L, M, upper=False).mT, upper=False
    )
    mu, V = torch.linalg.eigh(C)
    mu, V = mu.flip(-1)[:, :r].clamp_min(0.0), V.flip(-1)[:, :, :r]
    W = torch.linalg.solve_triangular(L.mT, V, upper=True)
    return torch.bmm(Z, W.to(Z.dtype)), mu


class StraightLine:
    """One every-step pkfac step as flat code on an MLP of Linear layers (see the module text)."""

    def __init__(self, model: nn.Module, seed: int = 0) -> None:
        self.model = model
        self.layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
        self.gen = torch.Generator().manual_seed(seed)
        self.factors = []
        for layer in self.layers:
            d_out, d_in = layer.weight.shape
            A = LowRankFactor(d_in + 1, self.gen)
            G = LowRankFactor(d_out, self.gen) if d_out > RANK else None
            self.factors.append((A, G))
        self.G_dense = [torch.eye(layer.weight.shape[0]) for layer in self.layers]
        self.captured: dict[int, tuple[Tensor, Tensor]] = {}
        for i, layer in enumerate(self.layers):
            layer.register_forward_hook(self._hook(i))

    def _hook(self, i: int) -> Callable:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            self.captured[i] = (inputs[0].detach(), output)

        return hook

    def statistics(self, output: Tensor) -> list[tuple[Any, Tensor, float]]:
        """Monte-Carlo output gradients and input rows: ``(factor or layer index, rows, scale)``."""
        with torch.no_grad():
            probs = torch.softmax(output.detach(), -1)
            target = torch.multinomial(probs, 1, generator=self.gen).squeeze(-1)
        outs = [self.captured[i][1] for i in range(len(self.layers))]
        grads = torch.autograd.grad(F.cross_entropy(output, target, reduction="sum"), outs,
                                    retain_graph=True)
        m = output.shape[0]
        items: list[tuple[Any, Tensor, float]] = []
        for i, ((A, G), g) in enumerate(zip(self.factors, grads)):
            a = self.captured[i][0]
            items.append((A, torch.cat([a, a.new_ones(m, 1)], 1), 1.0 / m))
            items.append((G if G is not None else i, g, 1.0 / m))
        return items

    def update_factors(self, items: list[tuple[Any, Tensor, float]]) -> None:
        low = [(f, x, s) for f, x, s in items if isinstance(f, LowRankFactor)]
        for i, x, s in ((f, x, s) for f, x, s in items if isinstance(f, int)):
            self.G_dense[i] = torch.addmm(self.G_dense[i], x.T, x, beta=DECAY,
                                          alpha=(1 - DECAY) * s)
        sq = torch.stack([torch.dot(x.reshape(-1), x.reshape(-1)) for _, x, _ in low]).tolist()
        f64 = dict(dtype=torch.float64)
        U_new, mu = refresh_core(
            [x for _, x, _ in low],
            [f.U for f, _, _ in low],
            [torch.randn(x.shape[0], SKETCH, generator=self.gen) for _, x, _ in low],
            torch.stack([f.lam for f, _, _ in low]).double(),
            torch.tensor([f.sigma for f, _, _ in low], **f64).view(-1, 1, 1),
            torch.tensor([(1 - DECAY) * s for _, _, s in low], **f64).view(-1, 1, 1),
        )
        sums = mu.sum(1).tolist()
        for i, ((f, _, s), t) in enumerate(zip(low, sq)):
            f.U, f.lam = U_new[i, : f.dim], mu[i].float()
            f.trace = DECAY * f.trace + (1 - DECAY) * s * t
            f.sigma = max(0.0, (f.trace - sums[i]) / (f.dim - RANK))

    @staticmethod
    def constants(A: LowRankFactor, eig_g: Tensor, sigma_g: float) -> Tensor:
        """``T = 1 / ([μ_G; σ_G] [μ_A; σ_A]ᵀ + λ)``."""
        ext_a = torch.cat([A.lam, A.lam.new_tensor([A.sigma])])
        ext_g = torch.cat([eig_g, eig_g.new_tensor([sigma_g])])
        return torch.outer(ext_g, ext_a).add_(DAMPING).reciprocal_()

    def step(self, x: Tensor, y: Tensor) -> None:
        output = self.model(x)
        items = self.statistics(output)
        loss = F.cross_entropy(output, y)
        for p in self.model.parameters():
            p.grad = None
        loss.backward()
        with torch.no_grad():
            grads = [p.grad for p in self.model.parameters()]
            norms = torch.stack([torch.dot(g.reshape(-1), g.reshape(-1)) for g in grads])
            self.update_factors(items)
            updates, inners = [], []
            for j, (layer, (A, G)) in enumerate(zip(self.layers, self.factors)):
                V = [layer.weight.grad, layer.bias.grad[:, None]]
                Ua = A.U
                if G is None:  # narrow output: dense G, full eigenbasis
                    mu_g, Qg = torch.linalg.eigh(self.G_dense[j])
                    T = self.constants(A, mu_g, 0.0)
                    X = torch.cat([Qg.T @ v for v in V], 1)
                    d2 = T[:-1, -1:]
                    R = torch.addmm(d2 * X, (X @ Ua) * (T[:-1, :-1] - d2), Ua.T)
                    inners.append(torch.dot(X.reshape(-1), R.reshape(-1)))
                    updates.append((layer, 0.0, Qg, R))
                    continue
                T = self.constants(A, G.lam, G.sigma)
                c = float(T[-1, -1])
                e2, e3 = T[:-1, -1:] - c, T[-1:, :-1] - c
                Y = torch.addmm(V[0] @ Ua[:-1], V[1], Ua[-1:])
                X = torch.cat([G.U.T @ v for v in V], 1)
                M2 = Y * e3
                R1 = torch.addmm(e2 * X, (X @ Ua) * (T[:-1, :-1] - T[:-1, -1:] - e3), Ua.T)
                inners.append(c * (norms[2 * j] + norms[2 * j + 1])
                              + torch.dot(X.reshape(-1), R1.reshape(-1))
                              + torch.dot(Y.reshape(-1), M2.reshape(-1)))
                updates.append((layer, c, torch.cat([G.U, M2], 1), torch.cat([R1, Ua.T], 0)))
            vg = float(sum(LR**2 * v for v in inners))
            scale = min(1.0, (KL_CLIP / vg) ** 0.5) if vg > 0 else 1.0
            for layer, c, Lm, Rm in updates:
                alpha = -LR * scale
                if c:
                    layer.weight.add_(layer.weight.grad, alpha=alpha * c)
                    layer.bias.add_(layer.bias.grad, alpha=alpha * c)
                layer.weight.addmm_(Lm, Rm[:, :-1], alpha=alpha)
                layer.bias[:, None].addmm_(Lm, Rm[:, -1:], alpha=alpha)


def step_times(steps: int, repeats: int) -> dict[str, list[float]]:
    """Median step time per variant and repeat; the variants take turns."""
    train, _ = load_dataset("mnist5k")
    x_all, y_all = train.tensors
    results: dict[str, list[float]] = {}
    for _ in range(repeats):
        for label in (*LIBRARY, "straight line"):
            torch.manual_seed(0)
            model = build_model("mlp", train.info, (1024, 1024))
            if label == "straight line":
                step = StraightLine(model).step
            else:
                name, options = LIBRARY[label]
                opt = make_optimizer(name, model, loss_kind="cross_entropy", **options)

                def step(x: Tensor, y: Tensor, model=model, opt=opt) -> None:
                    loss = F.cross_entropy(model(x), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()

            times = []
            for i in range(steps):
                start = (i * 128) % (len(x_all) - 128)
                x, y = x_all[start : start + 128], y_all[start : start + 128]
                t0 = time.perf_counter()
                step(x, y)
                times.append(time.perf_counter() - t0)
            results.setdefault(label, []).append(statistics.median(times[10:]))
    return results


# --------------------------------------------------------------------------- small kernels
def small_kernels() -> dict[str, float]:
    """Median seconds of the small operations the every-step refresh is made of."""
    gen = torch.Generator().manual_seed(0)
    B = torch.randn(5, 128, 36, generator=gen, dtype=torch.float64)
    M = B.mT @ B  # five 36 × 36 Rayleigh–Ritz matrices
    Mn = M.numpy()
    X = torch.randn(128, 1025, generator=gen)
    omega = torch.randn(128, 12, generator=gen)
    v = torch.randn(24, generator=gen)
    threads = torch.get_num_threads()
    out: dict[str, float] = {}
    for t in sorted({1, threads}):
        torch.set_num_threads(t)
        out[f"torch eigh, batch of 5, float64, {t} thread(s)"] = median_time(
            lambda: torch.linalg.eigh(M))
        out[f"torch eigh, batch of 5, float32, {t} thread(s)"] = median_time(
            lambda: torch.linalg.eigh(M.float()))
        out[f"torch eigh, loop of 5, float64, {t} thread(s)"] = median_time(
            lambda: [torch.linalg.eigh(m) for m in M])
    torch.set_num_threads(threads)
    out["torch eigvalsh (no vectors), batch of 5"] = median_time(lambda: torch.linalg.eigvalsh(M))
    out["numpy eigh, loop of 5"] = median_time(lambda: [np.linalg.eigh(m) for m in Mn])
    for driver in ("evd", "evr", "ev"):
        out[f"scipy eigh driver={driver}, loop of 5"] = median_time(
            lambda driver=driver: [scipy.linalg.eigh(m, driver=driver, check_finite=False)
                                   for m in Mn])
    out["sketch Xᵀ Ω as X.T @ Ω (1025 × 128 · 128 × 12)"] = median_time(lambda: X.T @ omega)
    out["sketch Xᵀ Ω as (Ωᵀ X)ᵀ"] = median_time(lambda: (omega.T @ X).T)
    out["in-place add on 24 numbers (dispatch)"] = median_time(lambda: v.add_(1.0), 20000)
    out["slice view (dispatch)"] = median_time(lambda: M[:, :-1, -1:], 20000)
    return out


def compile_probe() -> dict[str, float]:
    """The straight-line refresh core (five factors of the wide MLP), eager against compiled."""
    gen = torch.Generator().manual_seed(0)
    dims = [785, 1024, 1025, 1024, 1025]
    rows = [torch.randn(128, d, generator=gen) for d in dims]
    bases = [torch.linalg.qr(torch.randn(d, RANK, generator=gen))[0] for d in dims]
    omegas = [torch.randn(128, SKETCH, generator=gen) for _ in dims]
    f64 = dict(dtype=torch.float64)
    args = (rows, bases, omegas, torch.rand(5, RANK, generator=gen, **f64),
            torch.full((5, 1, 1), 1e-3, **f64), torch.full((5, 1, 1), 0.2 / 128, **f64))
    compiled = torch.compile(refresh_core, dynamic=False)
    t0 = time.perf_counter()
    compiled(*args)
    return {"eager refresh core": median_time(lambda: refresh_core(*args), 200),
            "compiled refresh core": median_time(lambda: compiled(*args), 200),
            "compile time (first call)": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=70, help="steps per variant and repeat")
    parser.add_argument("--repeats", type=int, default=3, help="turns of the variants")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--json", help="also write the results (seconds) to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    steps = step_times(args.steps, args.repeats)
    sgd = statistics.median(steps["sgd"])
    print(f"MLP 784-1024-1024-10, batch 128, {args.threads} threads, torch {torch.__version__}: "
          f"median step over {args.steps - 10} steps, median of {args.repeats} turns")
    print(format_table(["variant", "step ms", "/ SGD", "all turns (ms)"], [
        [k, f"{statistics.median(v) * 1e3:.2f}", f"{statistics.median(v) / sgd:.2f}x",
         ", ".join(f"{t * 1e3:.2f}" for t in v)] for k, v in steps.items()]))
    kernels = small_kernels()
    print()
    print(format_table(["small operation", "µs"],
                       [[k, f"{v * 1e6:.1f}"] for k, v in kernels.items()]))
    result: dict[str, Any] = {"threads": args.threads, "torch": torch.__version__,
                              "step_s": steps, "small_kernels_s": kernels}
    if args.compile:
        probe = compile_probe()
        print()
        print(format_table(["torch.compile probe", "ms"],
                           [[k, f"{v * 1e3:.2f}"] for k, v in probe.items()]))
        result["compile_s"] = probe
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
