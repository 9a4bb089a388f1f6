"""Do two ``natgrad analyze`` reports agree within their stated errors?

    python benchmarks/compare_analyze_reports.py A/report.json B/report.json

Each reported number is checked against the error the report states for it (or its printed
precision when it states none):

* exact quantities (traces, per-layer traces): relative 1e-5 (float32 sums in another order);
* Lanczos eigenvalues: relative ``max(10 · residual, 1e-5)`` (the relative residual bounds the
  error of a converged Ritz value); per-layer top eigenvalues: the run's tolerance ``tol``;
* SLQ estimates (log det, effective dimension) and probe estimates (K-FAC relative errors,
  coupling): the smaller of the two stated error bars (``error`` or ``stderr``);
* closed forms of the K-FAC factors, the condition number and the top-k overlaps: 3 significant
  digits (relative 1e-3; overlaps absolute 1e-3).

Prints one line per checked number that differs by more than its tolerance and a summary of the
largest ratio |difference| / tolerance; exit status 1 when any exceeds 1.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, float, float, float]]:
    """``(name, a, b, |diff| / tolerance)`` for every checked number."""
    out: list[tuple[str, float, float, float]] = []

    def rel(name: str, x: float, y: float, tol: float) -> None:
        if x is None or y is None:
            out.append((name, x, y, 0.0 if x is y else float("inf")))
            return
        out.append((name, x, y, _rel(x, y) / tol))

    def err(name: str, x: dict[str, Any], y: dict[str, Any]) -> None:
        bar = min(x.get("error", x["stderr"]), y.get("error", y["stderr"]))
        out.append((name, x["value"], y["value"], abs(x["value"] - y["value"]) / max(bar, 1e-300)))

    rel("trace", a["trace"]["value"], b["trace"]["value"], 1e-5)
    for i, (x, y) in enumerate(zip(a["top_eigenvalues"], b["top_eigenvalues"], strict=True)):
        res = max(a["top_residuals"][i], b["top_residuals"][i])
        rel(f"top_eigenvalues[{i}]", x, y, max(10 * res, 1e-5))
    rel("condition_number", a["condition_number"]["value"], b["condition_number"]["value"], 1e-3)
    for key in ("logdet", "effective_dimension"):
        if a.get(key) and b.get(key):
            err(key, a[key], b[key])
    err("coupling", a["coupling"], b["coupling"])
    for k, x in a["approximations"].items():
        y = b["approximations"][k]
        err(f"{k}.relative_error", x["relative_error"], y["relative_error"])
        for i, (u, v) in enumerate(zip(x["top_eigenvalues_closed_form"],
                                       y["top_eigenvalues_closed_form"], strict=True)):
            rel(f"{k}.top_eigenvalues_closed_form[{i}]", u, v, 1e-3)
        rel(f"{k}.trace_closed_form", x["trace_closed_form"], y["trace_closed_form"], 1e-3)
        rel(f"{k}.logdet_closed_form", x["logdet_closed_form"], y["logdet_closed_form"], 1e-3)
        out.append((f"{k}.top_k_overlap", x["top_k_overlap"], y["top_k_overlap"],
                    abs(x["top_k_overlap"] - y["top_k_overlap"]) / 1e-3))
    tol = a.get("tol", 1e-3)
    for x, y in zip(a["layers"], b["layers"], strict=True):
        n = f"layers[{x['name']}]"
        rel(f"{n}.trace", x["trace"], y["trace"], 1e-5)
        for i, (u, v) in enumerate(zip(x["top_eigenvalues"], y["top_eigenvalues"], strict=True)):
            rel(f"{n}.top_eigenvalues[{i}]", u, v, tol)
        for k in a["approximations"]:
            bar = min(x[f"{k}_relative_error_stderr"], y[f"{k}_relative_error_stderr"])
            u, v = x[f"{k}_relative_error"], y[f"{k}_relative_error"]
            out.append((f"{n}.{k}_relative_error", u, v, abs(u - v) / max(bar, 1e-300)))
            rel(f"{n}.{k}_trace", x[f"{k}_trace"], y[f"{k}_trace"], 1e-3)
            for i, (u, v) in enumerate(zip(x[f"{k}_top_eigenvalues"], y[f"{k}_top_eigenvalues"],
                                           strict=True)):
                rel(f"{n}.{k}_top_eigenvalues[{i}]", u, v, 1e-3)
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    a, b = (json.load(open(p)) for p in argv)
    rows = compare(a, b)
    bad = [r for r in rows if not r[3] <= 1.0]
    for name, x, y, ratio in bad:
        print(f"DIFFERS {name}: {x!r} vs {y!r} ({ratio:.2g}× its tolerance)")
    worst = max(rows, key=lambda r: r[3])
    print(f"{len(rows)} numbers checked, {len(bad)} beyond their stated error; largest "
          f"|diff|/tolerance {worst[3]:.2g} ({worst[0]})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
