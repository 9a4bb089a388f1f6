"""The ``peers`` part of ``natgrad reproduce``: Fisher analysis side by side with BackPACK and
curvlinops (:mod:`natgrad.bench.analysis`), when at least one of them is installed.

The peers are an optional benchmark extra, never a dependency of natgrad::

    pip install --no-deps -r benchmarks/requirements-peers.txt
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .context import Context, PartUnavailable

INSTALL = "pip install --no-deps -r benchmarks/requirements-peers.txt"


def run_peers(ctx: Context) -> dict[str, Any]:
    """Time, peak memory and error against the dense float64 reference of every quantity, for
    natgrad and each installed peer, interleaved in this process."""
    from ..bench.analysis import Settings, peer_versions, run_benchmark

    versions = peer_versions()
    if versions.get("backpack") is None and versions.get("curvlinops") is None:
        raise PartUnavailable(f"neither BackPACK nor curvlinops is installed ({INSTALL})")
    s = ctx.settings
    bench = Settings(samples=s.peers_samples, repeats=s.peers_repeats, threads=1,
                     memory=s.peers_memory)
    return run_benchmark(bench, progress=ctx.note)


def peers_md(doc: Mapping[str, Any]) -> str:
    """The side-by-side table, the machine line and how to rerun it."""
    from ..bench.analysis import summary, table

    return "\n\n".join([
        "Each library computes each quantity on the same model and samples, one thread, the "
        "libraries taking turns (median of the repeats); *err* is the relative error against "
        "a dense float64 `torch.func` reference (for Hutchinson / Hutch++ it is the estimator's "
        "error at that number of products). Peak memory is measured in a fresh process per "
        f"cell. Peers: `{INSTALL}`; standalone: `python benchmarks/analysis_peers.py`.",
        table(dict(doc)), summary(dict(doc)) + "."])
