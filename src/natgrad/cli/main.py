"""Entry point of the ``natgrad`` command.

Each sub-command is a module with ``add_parser(subparsers)``, which registers its parser and sets
``func`` (``func(args) -> int``) as a default. Adding a sub-command is one entry in
:data:`COMMANDS`.

Exit codes: 0 success; 2 bad arguments (found before any work); 1 a failure during the work;
130 interrupted. Every failure is one line on stderr, ``natgrad <command>: error: …``; set
``NATGRAD_DEBUG=1`` (or pass ``--debug`` before the command) to get the exception with its
traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .._version import __version__

#: OpenMP wait policy of the command, unless the environment sets one: set before torch is
#: imported (the OpenMP runtime reads it once). With the default (spinning) policy, idle OpenMP
#: threads busy-wait, which on an oversubscribed machine takes the cores from the thread doing
#: the work: measured with torch 2.13 / MKL on a shared 2-core machine (load ~4), 2 threads,
#: ``eigh`` of an 832 × 832 matrix took 12.8 s spinning and 0.15 s passive (0.17 s with one
#: thread), of a 3137 × 3137 one 27.5 s against 6.6 s. Only the commands in
#: :data:`PASSIVE_COMMANDS` set it: the timing commands (compare, bench, reproduce) keep the
#: runtime's default, so their step-time figures stay comparable between rounds.
OMP_WAIT_POLICY = "PASSIVE"
PASSIVE_COMMANDS = ("analyze",)

from . import analyze, bench, compare, race, reproduce  # noqa: E402
from .common import ArgumentParser, UsageError  # noqa: E402

COMMANDS = [compare, analyze, bench, race, reproduce]
#: environment variable that, set to a value other than ``""`` / ``"0"``, re-raises failures
DEBUG_ENV = "NATGRAD_DEBUG"


def build_parser() -> ArgumentParser:
    """The top-level parser with every sub-command of :data:`COMMANDS`."""
    parser = ArgumentParser(
        prog="natgrad",
        description="Fisher analysis and natural-gradient optimizers for PyTorch.",
        epilog=f"Exit codes: 0 success, 1 failure during the work, 2 bad arguments, 130 "
        f"interrupted. Errors are one line on stderr; {DEBUG_ENV}=1 or --debug shows the "
        "traceback.",
    )
    parser.add_argument("--version", action="version", version=f"natgrad {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="re-raise failures with their traceback; give it before the command "
                        f"(natgrad --debug compare ...), or set {DEBUG_ENV}=1")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def debugging(args: argparse.Namespace) -> bool:
    """Whether failures are re-raised: ``--debug`` was given or ``NATGRAD_DEBUG`` is set."""
    return bool(args.debug) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def one_line(text: str) -> str:
    """``text``'s non-empty lines, stripped and joined with ``"; "``."""
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def describe_failure(exc: BaseException) -> str:
    """``Type: message`` of an unexpected exception, on one line (``Type`` alone if no message)."""
    message = one_line(str(exc))
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``natgrad`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    Usage errors print one line ``natgrad <command>: error: …`` on stderr and return 2; any
    other exception of the command prints one line ``natgrad <command>: error: <Type>: …`` and
    returns 1 (re-raised instead under ``--debug`` / ``NATGRAD_DEBUG=1``); Ctrl-C returns 130.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help / --version (0) or a one-line usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    prog = f"natgrad {args.command}"
    if args.command in PASSIVE_COMMANDS and "torch" not in sys.modules:  # parsing imports none
        os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"{prog}: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debugging(args):
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debugging(args):
            raise
        print(f"{prog}: error: {describe_failure(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
