"""The curvature engine: one object for layers, statistics, factors and solves.

* :mod:`.registration` — which layers get a curvature block (one rule, with reasons);
* :mod:`.engine` — :class:`KroneckerCurvature`, the blocks, batched updates, refreshes, solves;
* :mod:`.hooks` — the optimizer's capture, from the user's own forward and backward;
* :mod:`.data` — the analysis' capture, from one pass over a data set;
* :mod:`.rows` — the row math both captures share (output directions, batched pull-back);
* :mod:`.outputs` — finding the logits in a model's output (``output_key``);
* :mod:`.damping` — the damping floor a block's factor precision resolves;
* :mod:`.statistics` — the Fisher kinds and the per-layer statistics type.
"""

from ..blocks import LayerStatistics
from .data import (
    Gram,
    StatisticSums,
    check_deterministic,
    count_samples,
    data_statistics,
    iter_chunks,
    pullbacks,
)
from .engine import KroneckerCurvature, check_factor_dtype, factor_dtype_for
from .hooks import ACCUMULATIONS, LOSS_REDUCTIONS, CaptureReport, CurvatureCapture, HookCapture
from .outputs import check_output_key, find_output
from .registration import Registration, discover, unwrap
from .rows import output_directions, pullback
from .statistics import FISHER_TYPES, Statistics, check_fisher

__all__ = [
    "ACCUMULATIONS",
    "FISHER_TYPES",
    "LOSS_REDUCTIONS",
    "CaptureReport",
    "CurvatureCapture",
    "Gram",
    "StatisticSums",
    "HookCapture",
    "KroneckerCurvature",
    "LayerStatistics",
    "Registration",
    "Statistics",
    "check_deterministic",
    "check_factor_dtype",
    "check_fisher",
    "check_output_key",
    "count_samples",
    "data_statistics",
    "discover",
    "factor_dtype_for",
    "find_output",
    "iter_chunks",
    "output_directions",
    "pullback",
    "pullbacks",
    "unwrap",
]
