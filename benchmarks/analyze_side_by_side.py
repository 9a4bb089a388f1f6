"""Time ``natgrad analyze`` at its defaults in several source trees, alternating, same machine.

    python benchmarks/analyze_side_by_side.py OUT TREE [TREE ...] [--repeats 2] [--threads 2]
        [--env NAME=VALUE ...] [-- extra analyze flags]

Each ``TREE`` is a checkout (``git worktree add /tmp/old <commit>``), optionally ``LABEL=PATH``;
its ``src`` goes on ``PYTHONPATH``. The trees run one after another, ``--repeats`` rounds, so a
change of the machine's load hits all of them alike; each run writes ``OUT/<label>-<i>/`` and
its stdout. Prints per run the wall time, the peak RSS (the report's ``peak_rss_mb``) and
the report's per-stage ``timings_s``, with the load average at the start (ratios between runs of
one round are what count on a shared machine). Agreement of the numbers:
``benchmarks/compare_analyze_reports.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

STAGES = ("trace", "top_k", "density", "kfac", "approximation", "layers")


def run_one(label: str, tree: Path, out: Path, threads: int, env: dict[str, str],
            extra: list[str]) -> dict[str, object]:
    """One ``natgrad analyze`` in ``tree``; its wall time, peak RSS and stage timings."""
    load = os.getloadavg()[0]
    cmd = [sys.executable, "-m", "natgrad", "analyze", "--threads", str(threads), "--no-progress",
           "--out", str(out), *extra]
    t0 = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as log:
        subprocess.run(cmd, cwd=tree, check=True, stdout=log, stderr=subprocess.STDOUT,
                       env={**os.environ, "PYTHONPATH": str(tree / "src"), **env})
    wall = time.perf_counter() - t0
    report = json.loads((out / "report.json").read_text())
    return {"run": label, "wall_s": wall, "load": load,
            "peak_rss_mb": report.get("peak_rss_mb", float("nan")),
            **{s: report["timings_s"].get(s, float("nan")) for s in STAGES}}


def main(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("trees", nargs="+")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    args = p.parse_args(argv)
    env = dict(e.split("=", 1) for e in args.env)
    trees = [t.split("=", 1) if "=" in t else (Path(t).name, t) for t in args.trees]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(1, args.repeats + 1):
        for label, tree in trees:
            rows.append(run_one(f"{label}-{i}", Path(tree).resolve(), args.out / f"{label}-{i}",
                                args.threads, env, extra))
            r = rows[-1]
            print(f"{r['run']:>16}  wall {r['wall_s']:7.1f} s  load {r['load']:4.1f}  peak RSS "
                  f"{r['peak_rss_mb']:6.0f} MB  " + "  ".join(f"{s} {r[s]:.1f}" for s in STAGES),
                  flush=True)
    (args.out / "side_by_side.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
