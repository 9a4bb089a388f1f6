"""Fisher analysis side by side: natgrad vs BackPACK vs curvlinops (time, peak memory, error).

    PYTHONPATH=src python benchmarks/analysis_peers.py                 # both models, all rows
    PYTHONPATH=src python benchmarks/analysis_peers.py --models mlp --quantities trace diagonal
    PYTHONPATH=src python benchmarks/analysis_peers.py --out docs/results/analysis_peers.json

Peers (optional, never a natgrad dependency):

    pip install --no-deps -r benchmarks/requirements-peers.txt

A peer that does not import is reported as "not installed". What is measured and how:
:mod:`natgrad.bench.analysis`. Check ``uptime`` first: on a shared machine only the ratios in
one run mean anything; ``--threads 1`` (the default) keeps multi-threaded kernels from stalling.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from natgrad.bench.analysis import MODELS, QUANTITIES, Settings, run_benchmark, summary, table
from natgrad.report import write_json


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--quantities", nargs="+", default=list(QUANTITIES), choices=QUANTITIES)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--tol", type=float, default=1e-4,
                   help="relative residual of the top-k eigenpairs (all libraries)")
    p.add_argument("--matvecs", type=int, default=60, help="products for Hutchinson / Hutch++")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-memory", action="store_true",
                   help="skip the peak-memory subprocesses (one per measurement)")
    p.add_argument("--out", metavar="JSON", help="also write the measurements here")
    a = p.parse_args(argv)
    s = Settings(samples=a.samples, repeats=a.repeats, top_k=a.top_k, tol=a.tol,
                 matvecs=a.matvecs, threads=a.threads, memory=not a.no_memory)
    result = run_benchmark(s, tuple(a.models), tuple(a.quantities),
                           progress=lambda msg: print(f"  {msg}", file=sys.stderr, flush=True))
    print(table(result))
    print()
    print(summary(result))
    if a.out:
        write_json(Path(a.out), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
