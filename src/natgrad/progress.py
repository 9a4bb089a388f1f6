"""Progress bars: shown only on a terminal (stderr is a TTY) and when enabled; otherwise a
silent stand-in with the same methods, so callers never branch."""

from __future__ import annotations

import sys
from typing import Any


class _Silent:
    """The interface of a tqdm bar, doing nothing."""

    def __init__(self, total: int | None = None, **kwargs: Any) -> None:
        self.total = total or 0
        self.n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_description(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:
        pass

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __iter__(self):
        return iter(())


def progress_bar(total: int | None = None, enabled: bool = True, **kwargs: Any) -> Any:
    """A tqdm bar on stderr when ``enabled`` and stderr is a terminal, else a silent stand-in."""
    if not enabled or not sys.stderr.isatty():
        return _Silent(total=total)
    from tqdm.auto import tqdm

    return tqdm(total=total, dynamic_ncols=True, file=sys.stderr, **kwargs)
