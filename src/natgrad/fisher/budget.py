"""Memory as a budget: the stages of :func:`natgrad.fisher.analysis.analyze` planned under a
number of bytes before anything large is allocated.

Everything the analysis holds that grows with ``P`` is a few *vectors of P* (4 bytes each per
parameter for a float32 model, 8 for float64): the Lanczos basis of the top eigenpairs, the SLQ
runs, the probes of the approximation errors and their products, the exact diagonal, one
product's temporaries. The rest is fixed: the model, the rows of ``B_n J_n``
(:class:`~natgrad.fisher.rows.RowFisher`, ``O(N · widths)``) or the cached forward passes, and
the K-FAC approximations' factors (one ``d × d`` eigenbasis per dense factor: as much as a
vector of ``P`` for a wide layer). The plan is made once the trace and K-FAC stages have built
these (the first products of the analysis; nothing else of size ``P`` is alive then) and covers
the stages from top-``k`` on. It picks, stage by stage, the largest configuration that fits:

====================  ==============================================  ===========================
stage                 vectors of ``P`` alive                          shrinks to
====================  ==============================================  ===========================
trace                 the diagonal + 1                                —
top_k                 ``b + 1`` basis + one product (``w``)           ``b`` from ``2k + 4`` down
                      (``max(b + 1, 2k)`` while the Ritz vectors      to ``k + 2``
                      are copied out)
density               ``batch · steps`` (reorthogonalised runs)       streamed: the three-term
                      or ``batch · 3`` (streamed) + probes            recurrence
approximation         one probe at a time: ``v, F v, D v``, one       —
                      block's masked probe and product, one
                      approximation's product (6); the top-k
                      vectors are gone (their overlaps are taken
                      at top_k)
layers                the block's basis (``≤ b + 1`` of ``P_ℓ``)      (as top_k)
====================  ==============================================  ===========================

plus :data:`PRODUCT_VECTORS` for one product's temporaries everywhere.

With the spectrum from the rows' Gram matrix (``gram_rows = n = N·R``, :mod:`natgrad.fisher.dual`)
the top-``k`` stage holds two ``n × n`` matrices (the Gram's sum and one layer's, or the sum and
LAPACK's copy) and then, one at a time, a lifted eigenvector, its product and the
approximations' ``k`` top eigenvectors; the density is exact (no vectors of ``P``); the layers
hold one lifted vector and its product (a Lanczos basis only for layers narrower than ``n``,
of vectors shorter than ``n``). When even the smallest
configuration does not fit, :func:`plan_analysis` raises :class:`BudgetError` with the plan
and the budget that would fit (``natgrad analyze --memory-gb``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

GB = 1 << 30
#: vectors of ``P`` one product allocates besides its input and output (the RowFisher's
#: per-layer ``[W | b]`` reshapes, measured on the MLPs of benchmarks/analysis_memory.py)
PRODUCT_VECTORS = 3


def _gb(n: float) -> str:
    """Bytes as GB (MB below 0.1 GB)."""
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / (1 << 20):.1f} MB"


class BudgetError(ValueError):
    """The analysis cannot fit its memory budget; the message holds the plan and what fits."""


def available_bytes() -> int:
    """What the machine has free now: ``MemAvailable`` of ``/proc/meminfo`` (Linux), else the
    total physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class AnalysisPlan:
    """The configuration :func:`plan_analysis` chose and the bytes each stage needs.

    Attributes:
        budget: the bytes allowed.
        params: ``P``.
        item: bytes of one float of the operator (4 or 8).
        fixed: bytes held throughout (model, rows or cached forward passes, K-FAC factors).
        max_basis: vectors kept by the top-``k`` and per-layer Lanczos runs.
        basis_dtype: their dtype (the operator's: a float32 basis put the eigenvalues of a
            float32 operator ~7e-7 off, relative, far below the residual tolerance).
        min_steps: steps of the top-``k`` run's first cycle (``slq_steps`` when it doubles as
            the first SLQ probe, else ``0``).
        slq_reorthogonalize: whether the SLQ runs keep their basis.
        slq_batch: SLQ runs made together.
        stages: stage → peak bytes (fixed part included).
        gram_rows: ``n = N·R`` when the spectrum comes from the rows' Gram matrix, else
            ``None``.
    """

    budget: int
    params: int
    item: int
    fixed: int
    max_basis: int
    basis_dtype: torch.dtype
    min_steps: int
    slq_reorthogonalize: bool
    slq_batch: int
    stages: dict[str, int] = field(default_factory=dict)
    gram_rows: int | None = None

    @property
    def peak(self) -> int:
        """The largest stage, in bytes."""
        return max(self.stages.values())

    def text(self) -> str:
        """The plan as a few lines (printed by ``natgrad analyze``)."""
        P = self.params
        lines = [f"memory plan: budget {_gb(self.budget)}, peak {_gb(self.peak)} "
                 f"({self.peak / P:.0f} bytes/parameter for {P:,} parameters); fixed "
                 f"{_gb(self.fixed)} (model, rows / cached passes, K-FAC factors)",
                 ]
        if self.gram_rows is not None:
            n = self.gram_rows
            lines.append(f"  spectrum: the rows' Gram matrix, {n:,} x {n:,} (two held: "
                         f"{_gb(2 * n * n * self.item)}); exact eigenvalues, no SLQ probes")
        else:
            lines += [f"  top-k Lanczos: basis of {self.max_basis} vectors "
                      f"({str(self.basis_dtype).replace('torch.', '')})"
                      + (f", first cycle {self.min_steps} steps reused as an SLQ probe"
                         if self.min_steps else ""),
                      f"  SLQ: {self.slq_batch} run(s) at a time, "
                      + ("basis kept (full reorthogonalisation)" if self.slq_reorthogonalize
                         else "streamed (three-term recurrence, no basis kept)")]
        lines += [f"  {name:<14} {_gb(b):>10}" for name, b in self.stages.items()]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready (the report's ``memory_plan``)."""
        return {"budget_bytes": self.budget, "peak_bytes": self.peak, "fixed_bytes": self.fixed,
                "bytes_per_parameter": self.peak / self.params, "max_basis": self.max_basis,
                "basis_dtype": str(self.basis_dtype).replace("torch.", ""),
                "min_steps": self.min_steps, "slq_reorthogonalize": self.slq_reorthogonalize,
                "slq_batch": self.slq_batch, "gram_rows": self.gram_rows,
                "stages_bytes": dict(self.stages)}


def plan_analysis(params: int, item: int, fixed: int, budget: int, top_k: int = 10,
                  probes: int = 4, slq_steps: int = 40, density: bool = True,
                  gram_rows: int | None = None) -> AnalysisPlan:
    """The configuration of the analysis' stages within ``budget`` bytes.

    The peak is set by the top-``k`` basis: the longest basis from ``2k + 4`` down to ``k + 2``
    (in the operator's dtype) that fits. The other stages then take their most accurate
    configuration that stays under that peak: the top-``k`` run's first cycle reused as an SLQ
    probe when it is no longer than the basis, SLQ runs with their basis kept
    (reorthogonalised) when one fits, else streamed, as many together as fit. A larger budget
    is not spent for its own sake (the machine is shared); it only lets a larger request fit.

    Args:
        params: ``P``.
        item: bytes per float of the operator (4: float32, 8: float64).
        fixed: bytes held throughout (the model, the rows or the cached forward passes, the
            K-FAC approximations' factors).
        budget: bytes allowed for the whole analysis.
        top_k, probes, slq_steps, density: as :func:`~natgrad.fisher.analysis.analyze`.
        gram_rows: ``n = N·R`` when the spectrum comes from the rows' Gram matrix (then the
            top-``k`` and density stages follow the module docstring's last paragraph).

    Raises:
        BudgetError: the smallest configuration does not fit; the message names
            ``--memory-gb`` and the budget that would.
    """
    k = min(top_k, params)
    vec = params * item
    dtype = torch.float64 if item == 8 else torch.float32

    def stages(basis: int, min_steps: int, reorth: bool, batch: int) -> dict[str, int]:
        out = {"trace": fixed + (2 + PRODUCT_VECTORS) * vec}
        if gram_rows is not None:
            n = gram_rows
            out["top_k"] = fixed + max(2 * n * n * item + 2 * (basis + 1) * n * 8,
                                       (k + 2 + PRODUCT_VECTORS) * vec)
            if density:
                out["density"] = fixed + 2 * n * 8
        else:
            held = max(basis + 1, min_steps + 1, 2 * k) * vec
            out["top_k"] = fixed + held + (2 + PRODUCT_VECTORS) * vec
            if density:
                per_run = (slq_steps if reorth else 3) * vec
                out["density"] = fixed + batch * (per_run + vec) + (1 + PRODUCT_VECTORS) * vec
        out["approximation"] = fixed + (6 + PRODUCT_VECTORS) * vec
        # with the Gram, Lanczos runs only on layers narrower than n (vectors shorter than n)
        width = vec if gram_rows is None else min(vec, gram_rows * item)
        out["layers"] = fixed + (basis + 1) * width + (2 + PRODUCT_VECTORS) * vec
        return out

    smallest = stages(min(k + 2, params), 0, False, 1)
    bases = [b for b in range(2 * k + 4, k + 1, -2)] or [k + 2]
    chosen = next((b for b in bases if max(stages(min(b, params), 0, False, 1).values())
                   <= budget), None)
    if chosen is None:
        plan = AnalysisPlan(budget, params, item, fixed, min(k + 2, params), dtype, 0, False,
                            1, smallest, gram_rows)
        need = max(smallest.values())
        raise BudgetError(
            f"the analysis of {params:,} parameters needs at least {_gb(need)} but the "
            f"memory budget is {_gb(budget)}; pass --memory-gb {need / GB + 0.005:.2f} "
            f"or more (on a machine that has it free), or fewer --probes / --top-k / "
            f"--samples.\n{plan.text()}")
    basis = min(chosen, params)
    cap = max(stages(basis, 0, False, 1).values())

    def under(s: dict[str, int]) -> bool:
        return max(s.values()) <= cap

    min_steps = slq_steps if density and under(stages(basis, slq_steps, False, 1)) else 0
    reorth, batch = False, 1
    if gram_rows is not None:
        min_steps = 0
    elif density:
        for b in range(min(probes, 4), 0, -1):
            if under(stages(basis, min_steps, True, b)):
                reorth, batch = True, b
                break
        else:
            batch = max([b for b in range(1, min(probes, 4) + 1)
                         if under(stages(basis, min_steps, False, b))] or [1])
    return AnalysisPlan(budget, params, item, fixed, basis, dtype, min_steps, reorth, batch,
                        stages(basis, min_steps, reorth, batch), gram_rows)
