"""Peak resident memory and wall time of ``natgrad analyze`` on MLPs of growing width, for one or
two source trees (e.g. this branch against a checkout of main), one run at a time.

Each run is a fresh process under ``/usr/bin/time -v`` (peak RSS as the kernel counts it) with
the same arguments; the machine's load (``/proc/loadavg``) before and after each run is recorded,
since the machine may be shared. The headline numbers of each report (trace, top eigenvalues and
residuals, log det and effective dimension with their error bars, the approximation errors) are
copied next to the figures so that the variants can be compared within their stated errors.

    python benchmarks/analysis_memory.py --hidden 1024 4096 --variant after=src \\
        --variant before=/work/main/src --out runs/analysis_memory.json

Add ``--memory-gb`` etc. after ``--`` to pass them to ``natgrad analyze`` (only the trees that
know the flag accept it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path


def run_one(src: str, hidden: int, samples: int, threads: int, out: Path,
            extra: list[str]) -> dict:
    """One ``natgrad analyze`` under ``/usr/bin/time -v``; its figures and report headlines."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "natgrad", "analyze", "--model", "mlp",
           "--hidden", f"{hidden},{hidden}", "--samples", str(samples), "--threads",
           str(threads), "--no-progress", "--out", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": str(threads)}
    load0 = Path("/proc/loadavg").read_text().split()[:3]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    row = {"src": src, "hidden": hidden, "samples": samples, "threads": threads,
           "command": " ".join(cmd[2:]), "returncode": proc.returncode,
           "wall_s": time.time() - t0, "peak_rss_bytes": int(rss.group(1)) * 1024 if rss else None,
           "load_before": load0, "load_after": Path("/proc/loadavg").read_text().split()[:3]}
    report = out / "report.json"
    if proc.returncode == 0 and report.is_file():
        r = json.loads(report.read_text())
        row.update(params=r["params"], trace=r["trace"]["value"],
                   top_eigenvalues=r["top_eigenvalues"], top_residuals=r["top_residuals"],
                   logdet=r.get("logdet"), effective_dimension=r.get("effective_dimension"),
                   approximations={k: a["relative_error"] for k, a in
                                   r["approximations"].items()},
                   coupling=r["coupling"], timings_s=r["timings_s"],
                   memory_plan=r.get("memory_plan"))
        row["bytes_per_parameter"] = row["peak_rss_bytes"] / r["params"] if rss else None
    else:
        row["stderr_tail"] = proc.stderr[-2000:]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, nargs="+", required=True, help="widths H (H,H MLP)")
    p.add_argument("--variant", action="append", required=True, metavar="NAME=SRC",
                   help="a source tree to run (PYTHONPATH), e.g. after=src")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/analysis_memory.json")
    p.add_argument("extra", nargs="*", help="further natgrad analyze flags (after --)")
    args = p.parse_args()
    out = Path(args.out)
    rows = json.loads(out.read_text())["runs"] if out.is_file() else []
    for hidden in args.hidden:
        for spec in args.variant:
            name, src = spec.split("=", 1)
            row = run_one(src, hidden, args.samples, args.threads,
                          out.parent / f"analyze_{name}_{hidden}", args.extra)
            row["variant"] = name
            rows.append(row)
            print(json.dumps({k: row.get(k) for k in ("variant", "hidden", "params",
                                                       "peak_rss_bytes", "bytes_per_parameter",
                                                       "wall_s", "returncode")}), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"machine": {"platform": platform.platform(),
                                                   "cpus": os.cpu_count()},
                                       "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
