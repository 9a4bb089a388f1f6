"""``natgrad reproduce``: regenerate docs/RESULTS.md (tables, figures, raw JSON) from scratch.

Parts: parity, timing, scaling, stability, analysis, discussion (see :mod:`natgrad.reproduce`).
Writes OUT/results/<part>.json, OUT/figures/*.png and OUT/RESULTS.md. Exit code 0 when every
selected part succeeded, 1 when one failed or was not available, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from .common import UsageError, describe, parse_names, split_list


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``reproduce`` on the top-level parser."""
    from ..reproduce import PARTS

    p = subparsers.add_parser("reproduce", help="regenerate docs/RESULTS.md from scratch",
                              description=describe(__doc__))
    p.add_argument("--quick", action="store_true",
                   help="fewer seeds, epochs, widths and samples (< 10 min on 2 cores)")
    p.add_argument("--out", default="docs", metavar="DIR",
                   help="writes DIR/RESULTS.md, DIR/results/*.json, DIR/figures/*.png "
                   "(default docs)")
    p.add_argument("--seeds", metavar="S1,S2,...",
                   help="seeds of the parity runs (default 0,1,2; --quick: 0)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--skip", metavar="PART,...", help=f"parts to leave out: {', '.join(PARTS)}")
    p.add_argument("--only", metavar="PART,...", help="run only these parts")
    p.add_argument("--discussion", metavar="PATH",
                   help="hand-written discussion included verbatim (default OUT/DISCUSSION.md "
                   "if it exists, else docs/DISCUSSION.md of the source tree)")
    p.add_argument("--render", action="store_true",
                   help="only rebuild OUT/RESULTS.md from the JSON of a previous run (e.g. after "
                   "editing the discussion); measures nothing")
    p.add_argument("--update", action="store_true",
                   help="with --only/--skip: the parts not run keep the results of the previous "
                   "run in DIR (marked with when and how they were measured) instead of being "
                   "reported as skipped")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests only
    p.set_defaults(func=run)
    return p


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in split_list(text))
    except ValueError:
        seeds = ()
    if not seeds or any(s < 0 for s in seeds):
        raise UsageError(f"--seeds expects non-negative integers like 0,1,2, got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds: a seed is listed twice in {text!r}")
    return seeds


def select_parts(only: str | None, skip: str | None) -> tuple[list[str], str]:
    """``(parts to run, why the others are skipped)`` from ``--only`` / ``--skip``."""
    from ..reproduce import PARTS

    if only is not None and skip is not None:
        raise UsageError("--only and --skip cannot be combined")
    if only is not None:
        chosen = parse_names(only, PARTS, "part")
        return [p for p in PARTS if p in chosen], f"not in --only {only}"
    if skip is not None:
        skipped = parse_names(skip, PARTS, "part")
        return [p for p in PARTS if p not in skipped], "--skip"
    return list(PARTS), ""


def command_line(args: argparse.Namespace) -> str:
    """The canonical command that reproduces this run."""
    words = ["natgrad", "reproduce"]
    if args.quick:
        words.append("--quick")
    if args.tiny:
        words.append("--tiny")
    if args.update:
        words.append("--update")
    words += ["--out", str(args.out)]
    for flag in ("seeds", "threads", "skip", "only", "discussion"):
        value = getattr(args, flag)
        if value is not None:
            words += [f"--{flag}", str(value)]
    return shlex.join(words)


def run(args: argparse.Namespace) -> int:
    from ..reproduce import MODES, reproduce

    parts, reason = select_parts(args.only, args.skip)
    if args.update and args.render:
        raise UsageError("--update and --render cannot be combined (--render measures nothing)")
    if args.tiny and args.quick:
        raise UsageError("--tiny and --quick cannot be combined")
    settings = MODES["tiny" if args.tiny else "quick" if args.quick else "full"]
    if args.seeds is not None:
        settings = settings.with_seeds(parse_seeds(args.seeds))
    if args.threads is not None:
        if args.threads <= 0:
            raise UsageError(f"--threads must be a positive integer, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    if args.discussion is not None and not Path(args.discussion).is_file():
        raise UsageError(f"--discussion {args.discussion}: no such file")
    from ..reproduce.runner import default_discussion

    discussion = Path(args.discussion) if args.discussion else default_discussion(out)
    if args.render:
        from ..reproduce.runner import render

        return render(out, discussion)
    return reproduce(settings, out, parts, command_line(args), skip_reason=reason,
                     discussion=discussion, progress=not args.no_progress,
                     update=args.update)
