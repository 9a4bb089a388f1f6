"""docs/RESULTS.md from the parts' JSON documents (pure functions, no I/O): the header, the
status table and one section per part (:mod:`.sections`), with the formatting of
:mod:`.format`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .capacity import capacity_md
from .format import DASH, figure, md_table, mean_std, num, pm, ratio
from .peers import peers_md
from .race import race_md
from .sections import (
    analysis_md,
    convergence_md,
    families_md,
    parity_md,
    scaling_md,
    stability_md,
    steps_md,
    timing_md,
    timing_ratios,
    timing_rows,
)

__all__ = ["DASH", "analysis_md", "convergence_md", "families_md", "figure", "md_table",
           "mean_std", "num", "parity_md", "pm", "ratio", "results_md", "scaling_md",
           "stability_md", "steps_md", "timing_md", "timing_ratios", "timing_rows"]

RENDERERS: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "parity": parity_md,
    "timing": timing_md,
    "scaling": scaling_md,
    "capacity": capacity_md,
    "stability": stability_md,
    "analysis": analysis_md,
    "peers": peers_md,
    "families": families_md,
    "steps": steps_md,
    "convergence": convergence_md,
    "race": race_md,
    "discussion": lambda doc: doc["text"].strip(),
}


def status_table(statuses: Mapping[str, Mapping[str, Any]], titles: Mapping[str, str]) -> str:
    """One row per part: status, seconds, when and in which mode it was measured, JSON file."""
    rows = []
    for part, st in statuses.items():
        seconds = st.get("time_s")
        when = DASH if not st.get("measured") else f"{st['measured']} ({st.get('mode')})"
        rows.append([titles.get(part, part), st["status"],
                     None if seconds is None else f"{seconds:.1f}", when,
                     f"[{st['json']}]({st['json']})" if st.get("json") else DASH])
    return md_table(["part", "status", "seconds", "measured", "raw JSON"], rows, "llrll")


def header_md(meta: Mapping[str, Any]) -> str:
    """The title and the generated-file notice with command, machine and date."""
    m = meta["machine"]
    lines = [
        "<!-- GENERATED FILE: do not edit. Regenerate with the command below; the discussion "
        "comes from docs/DISCUSSION.md. -->",
        "",
        "# natgrad results",
        "",
        f"> **Generated** by `{meta['command']}` on {meta['date']} "
        f"({meta['mode']} mode, {num(meta['total_time_s'] / 60)} min).  ",
        f"> Machine: {m['platform']}, {m['cpu_count']} CPUs, torch threads: {m['threads']}, "
        f"torch {m['torch']}, Python {m['python']}, natgrad {m['natgrad']}.",
    ]
    if meta["mode"] != "full":
        lines += ["", f"**{meta['mode']} mode**: fewer seeds, epochs, widths and samples than "
                  "the full run; a smoke test of the pipeline, not evidence."]
    return "\n".join(lines)


def results_md(meta: Mapping[str, Any], statuses: Mapping[str, Mapping[str, Any]],
               docs: Mapping[str, Mapping[str, Any]], titles: Mapping[str, str]) -> str:
    """The whole of RESULTS.md."""
    out = [header_md(meta), "## Parts", status_table(statuses, titles)]
    for part, st in statuses.items():
        out.append(f"## {titles.get(part, part)}")
        if st["status"] == "skipped":
            out.append(f"skipped ({st.get('reason', '--skip/--only')})")
            continue
        if st.get("command") and st["command"] != meta.get("command"):
            out.append(f"*Measured {st.get('measured')} by `{st['command']}` (an earlier run, "
                       "kept by `--update`).*")
        if st.get("note"):  # how a part's results were assembled, when not by one command
            out.append(f"*{st['note']}*")
        doc = docs.get(part)
        body = ""
        if doc is not None:
            try:
                body = RENDERERS[part](doc)
            except Exception as exc:  # a malformed document must not lose the other parts
                body = f"cannot render: {type(exc).__name__}: {exc}"
        if st["status"] != "ok":
            out.append(f"not available: {st.get('reason', st['status'])}")
        if body:
            out.append(body)
    return "\n\n".join(out) + "\n"
