"""Entry point of the ``natgrad`` command.

Each sub-command is a module with ``add_parser(subparsers)``, which registers its parser and sets
``func`` (``func(args) -> int``) as a default. Adding a sub-command is one entry in
:data:`COMMANDS`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from . import analyze, bench, compare, reproduce
from .common import ArgumentParser, UsageError

COMMANDS = [compare, analyze, bench, reproduce]


def build_parser() -> ArgumentParser:
    """The top-level parser with every sub-command of :data:`COMMANDS`."""
    parser = ArgumentParser(
        prog="natgrad",
        description="Fisher analysis and natural-gradient optimizers for PyTorch.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``natgrad`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    Usage errors print one line ``natgrad <command>: error: …`` on stderr and return 2.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a one-line usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"natgrad {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"natgrad {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
