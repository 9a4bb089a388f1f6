"""Run the parts in order, write each part's JSON, then RESULTS.md; see :func:`reproduce`."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..progress import progress_bar
from ..report import write_json
from .markdown import results_md
from .parts import RUNNERS, Context, PartUnavailable, available_optimizers
from .settings import (
    CALIBRATION_REF_S,
    PART_TITLES,
    PARTS,
    Settings,
    calibrate,
    estimate,
)


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or
            platform.machine(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "natgrad": __version__}


def default_discussion(out: Path) -> Path:
    """``OUT/DISCUSSION.md`` if it exists, else ``docs/DISCUSSION.md`` of the source tree."""
    if (out / "DISCUSSION.md").is_file():
        return out / "DISCUSSION.md"
    return Path(__file__).resolve().parents[3] / "docs" / "DISCUSSION.md"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def reproduce(settings: Settings, out: str | Path, parts: Sequence[str], command: str,
              skip_reason: str = "excluded by --skip/--only", discussion: Path | None = None,
              progress: bool = True, stream: Any = None, update: bool = False) -> int:
    """Run ``parts`` (in :data:`PARTS` order) and write ``OUT/results/<part>.json``,
    ``OUT/figures/*.png`` and ``OUT/RESULTS.md``.

    ``update``: the parts not run keep the results of the previous run in ``OUT`` (when its
    ``results/reproduce.json`` lists them with their JSON), each marked with the date, mode and
    command that measured it; otherwise they are reported as skipped.

    Returns 0 when every selected part succeeded, 1 when one failed or was not available.
    """
    stream = stream or sys.stdout
    out = Path(out)
    parts = [p for p in PARTS if p in parts]
    t_start = time.perf_counter()
    opts, missing = available_optimizers()
    mm, eig = calibrate()
    speed = mm / CALIBRATION_REF_S[0]
    lapack = eig / CALIBRATION_REF_S[1]
    est = estimate(settings, parts, opts, speed)
    print(f"natgrad reproduce ({settings.mode}): parts {', '.join(parts) or 'none'}; optimizers "
          f"{', '.join(opts)}" + (f" (not registered: {', '.join(missing)})" if missing else "")
          + f"; {torch.get_num_threads()} threads", file=stream)
    print("estimated time: " + ", ".join(f"{p} {_minutes(v)}" for p, v in est.items())
          + f"; total {_minutes(sum(est.values()))} (machine speed factor {speed:.2f} vs the "
          "2-core reference)", file=stream, flush=True)
    if lapack > 5 * max(speed, 1.0):
        print(f"warning: eigh runs {lapack:.0f}x slower than on the reference (matmul "
              f"{speed:.1f}x): the machine looks loaded and multi-threaded LAPACK stalls; "
              "K-FAC timings will be inflated. Use an idle machine or --threads 1.",
              file=stream, flush=True)

    statuses: dict[str, dict[str, Any]] = {
        p: {"status": "skipped", "reason": skip_reason} for p in PARTS if p not in parts}
    statuses = {p: statuses.get(p, {"status": "pending"}) for p in PARTS}
    docs: dict[str, dict[str, Any]] = {}
    if update:
        statuses, docs = _previous(out, [p for p in PARTS if p not in parts], statuses)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    (out / "results").mkdir(parents=True, exist_ok=True)
    log = out / "results" / "reproduce.log"
    log.write_text(f"{command}\n\n")
    with tempfile.TemporaryDirectory(prefix="natgrad-reproduce-") as work:
        bar = progress_bar(parts, desc="reproduce", disable=not progress, dynamic_ncols=True,
                   file=sys.stderr)
        ctx = Context(settings=settings, out=out, work=Path(work), discussion=discussion,
                      note=lambda text: bar.set_postfix_str(text))
        for part in bar:
            bar.set_description(part)
            t0 = time.perf_counter()
            status: dict[str, Any] = {"status": "ok", "measured": date, "mode": settings.mode,
                                      "command": command}
            try:
                doc = RUNNERS[part](ctx)
                docs[part] = doc
                if doc.get("errors"):
                    status = {"status": "failed", "reason": "; ".join(doc["errors"])}
            except PartUnavailable as exc:
                status = {"status": "not available", "reason": str(exc)}
            except Exception as exc:  # one part's failure must not lose the others
                status = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"
                          .splitlines()[0]}
                with log.open("a") as f:
                    f.write(f"part {part} failed:\n{traceback.format_exc()}\n")
            status["time_s"] = time.perf_counter() - t0
            status["estimate_s"] = est.get(part)
            if part in docs:
                status["json"] = f"results/{part}.json"
                write_json(out / status["json"], docs[part])
            statuses[part] = status
            bar.write(f"{part}: {status['status']} ({_minutes(status['time_s'])})"
                       + (f" - {status['reason']}" if status.get("reason") else ""), file=stream)
        bar.close()

    total = time.perf_counter() - t_start
    meta = {
        "command": command,
        "mode": settings.mode,
        "date": date,
        "machine": machine(),
        "total_time_s": total,
        "estimate_s": est,
        "speed_factor": speed,
        "eigh_slowdown": lapack,
        "optimizers": opts,
        "missing_optimizers": missing,
    }
    write_json(out / "results" / "reproduce.json", {**meta, "parts": statuses})
    (out / "RESULTS.md").write_text(results_md(meta, statuses, docs, PART_TITLES))
    failed = [p for p, st in statuses.items() if st["status"] not in ("ok", "skipped")]
    print(f"wrote {out / 'RESULTS.md'} in {_minutes(total)}"
          + (f"; not complete: {', '.join(failed)}" if failed else ""), file=stream)
    return 1 if failed else 0


def _saved_docs(out: Path, statuses: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The JSON documents of the parts whose status names a file that exists under ``out``."""
    return {p: json.loads((out / st["json"]).read_text())
            for p, st in statuses.items() if st.get("json") and (out / st["json"]).is_file()}


def _previous(out: Path, parts: Sequence[str], statuses: dict[str, dict[str, Any]]
              ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Statuses and documents of ``parts`` from the previous run in ``out``, where it has them
    (its status, with when and how it was measured); the others keep ``statuses``."""
    index = out / "results" / "reproduce.json"
    if not index.is_file():
        return statuses, {}
    saved = json.loads(index.read_text())
    old = {p: st for p, st in saved.get("parts", {}).items() if p in parts}
    docs = _saved_docs(out, old)
    statuses = {**statuses, **{p: {"measured": saved.get("date"), "mode": saved.get("mode"),
                                   "command": saved.get("command"), **old[p]} for p in docs}}
    return statuses, docs


def render(out: str | Path, discussion: Path | None = None, stream: Any = None) -> int:
    """Rebuild ``OUT/RESULTS.md`` from the JSON a previous run wrote (``OUT/results/``), with the
    discussion re-read from ``discussion``; nothing is measured again.

    Returns 0, or 2 when ``OUT/results/reproduce.json`` is missing.
    """
    stream = stream or sys.stdout
    out = Path(out)
    index = out / "results" / "reproduce.json"
    if not index.is_file():
        print(f"natgrad reproduce: error: {index} not found: run natgrad reproduce first",
              file=sys.stderr)
        return 2
    saved = json.loads(index.read_text())
    statuses = saved.pop("parts")
    docs = _saved_docs(out, statuses)
    if discussion is not None and discussion.is_file():
        docs["discussion"] = {"path": str(discussion), "text": discussion.read_text()}
    (out / "RESULTS.md").write_text(results_md(saved, statuses, docs, PART_TITLES))
    print(f"rebuilt {out / 'RESULTS.md'} from {index.parent}", file=stream)
    return 0
