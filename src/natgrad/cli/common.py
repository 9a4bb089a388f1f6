"""Helpers shared by the sub-commands: one-line usage errors, plain-text help, argument parsers.

Nothing here (nor in the sub-command modules, at import time) imports torch or numpy: building the
parser for ``--help`` and ``--version`` stays fast. The commands import the library when they run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NoReturn


class UsageError(Exception):
    """Bad command-line input; :func:`natgrad.cli.main.main` prints it as one line, exit code 2."""


_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`(~?)([^`<]*?)(?:\s*<[^>]*>)?`")  # :mod:`x`, :class:`~a.B`
_LITERAL = re.compile(r"``(.+?)``")
_INTERPRETED = re.compile(r"`([^`]+)`")


def plain(text: str) -> str:
    """``text`` without reStructuredText inline markup, for terminal help: ````x```` → ``x``,
    ``:class:`~a.b.C``` → ``C`` (``:mod:`a.b``` → ``a.b``), ```x``` → ``x``."""
    text = _ROLE.sub(lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2), text)
    text = _LITERAL.sub(r"\1", text)
    return _INTERPRETED.sub(r"\1", text)


def describe(doc: str | None) -> str:
    """A command's ``--help`` description: the first paragraph of its module docstring, plain."""
    first = (doc or "").strip().split("\n\n", 1)[0]
    return " ".join(plain(first).split())


class ArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are a single line on stderr (no usage dump), exit 2, and
    whose help is plain text (docstring markup removed by :func:`plain`)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")

    def format_help(self) -> str:
        return plain(super().format_help())


def split_list(text: str) -> list[str]:
    """``"a, b,,c"`` → ``["a", "b", "c"]``."""
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_names(text: str, accepted: Iterable[str], what: str) -> list[str]:
    """A comma list of registry names; rejects unknown and repeated names."""
    accepted = list(accepted)
    names = split_list(text)
    if not names:
        raise UsageError(f"no {what} given; accepted: {', '.join(accepted)}")
    for name in names:
        if name not in accepted:
            raise UsageError(f"unknown {what} {name!r}; accepted: {', '.join(accepted)}")
    if len(set(names)) != len(names):
        raise UsageError(f"a {what} is listed twice in {text!r}")
    return names


def parse_widths(text: str) -> tuple[int, ...]:
    """``"1024,1024"`` → ``(1024, 1024)``; positive integers only."""
    try:
        widths = tuple(int(p) for p in split_list(text))
    except ValueError:
        widths = ()
    if not widths or any(w <= 0 for w in widths):
        raise UsageError(f"--hidden expects positive integers like 1024,1024, got {text!r}")
    return widths


def parse_lrs(items: Sequence[str] | None, names: Sequence[str]) -> dict[str, float]:
    """``--lr`` values (``NAME=VALUE``, repeatable or comma-separated) → ``{name: lr}``."""
    lrs: dict[str, float] = {}
    for item in items or ():
        for pair in split_list(item):
            name, sep, value = pair.partition("=")
            name = name.strip()
            try:
                lr = float(value) if sep else float("nan")
            except ValueError:
                lr = float("nan")
            if not lr > 0 or lr == float("inf"):
                raise UsageError(
                    f"--lr expects NAME=VALUE with a positive number (e.g. sgd=0.05), got {pair!r}"
                )
            if name not in names:
                raise UsageError(
                    f"--lr names optimizer {name!r}, not among --optimizers: {', '.join(names)}"
                )
            lrs[name] = lr
    return lrs


def check_output_dir(path: str | Path, flag: str) -> None:
    """``UsageError`` unless ``path`` is (or can be created as) a writable directory: checked
    before any work, so a bad ``--out`` is not found after training. Creates nothing."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise UsageError(f"{flag} {path}: exists and is not a directory")
        if not os.access(p, os.W_OK | os.X_OK):
            raise UsageError(f"{flag} {path}: directory is not writable")
        return
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: cannot be created ({parent} is not a writable "
                         "directory)")


def config_error(exc: ValueError, config_type: type) -> UsageError:
    """A settings dataclass's ``ValueError`` as a usage error, its leading field name written as
    the flag (``epochs must be ...`` → ``--epochs must be ...``)."""
    message = str(exc)
    fields = {f.name for f in dataclasses.fields(config_type)}
    match = re.match(r"([a-z_]+)\b", message)
    if match and match.group(1) in fields:
        message = "--" + match.group(1).replace("_", "-") + message[match.end():]
    return UsageError(message)
