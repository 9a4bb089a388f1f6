"""The ``capacity`` part of ``natgrad reproduce``: registration, its markdown from a synthetic
document, one tiny run through the part's runner, and the estimate's growth."""

from __future__ import annotations

from dataclasses import replace

from natgrad.reproduce import PARTS
from natgrad.reproduce.capacity import capacity_md, estimate_capacity, run_capacity
from natgrad.reproduce.context import Context
from natgrad.reproduce.markdown import RENDERERS
from natgrad.reproduce.parts import RUNNERS
from natgrad.reproduce.settings import FULL, QUICK, TINY


def _row(model, width, opt, status, median=None, ratio=None, note=None):
    return {"model": model, "width": width, "hidden": [width, width], "params": 1000 * width,
            "optimizer": opt, "status": status, "note": note, "error": None,
            "first_step_s": 0.5 if median else None, "step_time_s_median": median,
            "ratio_to_sgd": ratio, "peak_rss_bytes": 3 * 2**30 if median else None,
            "state_fraction": 0.02 if median else None}


DOC = {"bench": {
    "meta": {"time_budget_s": 600.0, "memory_budget_gib": 20.0, "torch_threads": 2,
             "data": "mnist5k (embedded), float32", "command": "natgrad bench capacity"},
    "config": {"steps": 20, "warmup": 3, "batch": 128},
    "rows": [_row("mlp", 8192, "sgd", "ok", 1.0, 1.0), _row("mlp", 8192, "pkfac", "ok", 1.2, 1.2),
             _row("mlp", 16384, "kfac", "out_of_time", note="skipped: out_of_time at w=8192"),
             {**_row("widecnn", 512, "sgd", "ok", 2.0, 1.0), "hidden": [128, 256, 512]}]},
    "figure": "figures/capacity.png"}


def test_part_is_registered_after_scaling():
    assert PARTS[PARTS.index("scaling") + 1] == "capacity"
    assert RUNNERS["capacity"] is run_capacity and RENDERERS["capacity"] is capacity_md


def test_markdown_tables_per_model():
    md = capacity_md(DOC)
    assert "**MLP 784-w-w-10**" in md and "**widecnn, channels 128-256-512**" in md
    assert "| 8,192 | 8,192,000 | pkfac | ok | 0.5 | 1.2 | 1.2× | 3 | 2 % |" in md
    assert "| 16,384 | 16,384,000 | kfac | out_of_time (skipped: out_of_time at w=8192) | – |" in md
    assert "600 s of steps and 20 GiB" in md and "![" in md and "(figures/capacity.png)" in md


def test_tiny_run_through_the_runner(tmp_path):
    settings = replace(TINY, capacity_widths=(32,), capacity_cnn_channels=None,
                       capacity_optimizers=("pkfac",))
    ctx = Context(settings=settings, out=tmp_path / "out", work=tmp_path / "work")
    doc = run_capacity(ctx)
    (row,) = doc["bench"]["rows"]
    assert (row["model"], row["width"], row["optimizer"], row["status"]) == (
        "mlp", 32, "pkfac", "ok")
    assert doc["bench"]["meta"]["command"] == "natgrad reproduce --tiny --only capacity"
    assert doc["figure"] == "figures/capacity.png"
    assert (tmp_path / "out" / doc["figure"]).is_file()
    assert "pkfac" in capacity_md(doc)
    assert "pkfac" in (tmp_path / "out" / "results" / "reproduce.log").read_text()


def test_estimate_grows_with_the_mode():
    tiny, quick, full = (estimate_capacity(s) for s in (TINY, QUICK, FULL))
    assert 0 < tiny < quick < full
    assert full < len(FULL.capacity_optimizers) * 6 * (FULL.capacity_time_budget_s + 10)
