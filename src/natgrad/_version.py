"""The package version, with ``pyproject.toml`` as its only source.

An installed natgrad (wheel or editable) reads it from the package metadata; a source tree put on
``sys.path`` without being installed reads its own ``pyproject.toml``.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

UNKNOWN = "0+unknown"


def source_version(pyproject: Path) -> str | None:
    """``version`` of the ``[project]`` table of a ``pyproject.toml`` naming ``natgrad``, else
    ``None`` (no such file, or another project's)."""
    try:
        text = pyproject.read_text(encoding="utf-8")
    except OSError:
        return None
    table = re.search(r"^\[project\][ \t]*$(.*?)(?=^\[|\Z)", text, flags=re.M | re.S)
    if table is None or not re.search(r'^name\s*=\s*"natgrad"', table.group(1), flags=re.M):
        return None
    found = re.search(r'^version\s*=\s*"([^"]+)"', table.group(1), flags=re.M)
    return found.group(1) if found else None


def package_version() -> str:
    """The installed distribution's version, else the source tree's, else ``"0+unknown"``."""
    try:
        return version("natgrad")
    except PackageNotFoundError:
        pass
    return source_version(Path(__file__).resolve().parents[2] / "pyproject.toml") or UNKNOWN


__version__ = package_version()
