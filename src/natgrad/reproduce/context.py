"""What the parts of ``natgrad reproduce`` share: settings, folders, the log, progress notes."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .settings import PARITY_OPTIMIZERS, Settings


class PartUnavailable(Exception):
    """Something the part needs is not there (e.g. the hand-written discussion file)."""


@dataclass
class Context:
    """What the parts share: settings, output folders, a scratch folder, a log, progress notes."""

    settings: Settings
    out: Path
    work: Path
    discussion: Path | None = None
    note: Callable[[str], None] = lambda text: None
    shared: dict[str, Any] = field(default_factory=dict)

    @property
    def results_dir(self) -> Path:
        return self.out / "results"

    @property
    def figures_dir(self) -> Path:
        return self.out / "figures"

    @property
    def log_path(self) -> Path:
        return self.results_dir / "reproduce.log"

    def log(self, text: str) -> None:
        """Append ``text`` (what a library function printed) to ``results/reproduce.log``."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as f:
            f.write(text.rstrip("\n") + "\n")

    def figure(self, src: Path, name: str) -> str | None:
        """Copy ``src`` to ``figures/name``; returns the path relative to RESULTS.md."""
        if not src.is_file():
            return None
        self.figures_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, self.figures_dir / name)
        return f"figures/{name}"


def available_optimizers(names: Sequence[str] = PARITY_OPTIMIZERS) -> tuple[list[str], list[str]]:
    """``(registered, missing)`` among ``names``, looked up in the optimizer registry now."""
    from ..optim.registry import OPTIMIZERS

    return [n for n in names if n in OPTIMIZERS], [n for n in names if n not in OPTIMIZERS]
