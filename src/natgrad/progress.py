"""Progress bars: tqdm when it is installed and the output is a terminal, otherwise nothing.

Every bar of the library and the command-line tools comes from :func:`progress_bar`, which takes
tqdm's arguments. A bar is drawn only when all of these hold:

* the caller did not switch it off (``disable=True``: ``progress=False``, ``--no-progress``);
* its stream (``file=``, default ``sys.stderr``) is a terminal, so CI logs and pipes stay clean;
* tqdm is installed (the ``progress`` extra: ``pip install 'natgrad[progress]'``).

Otherwise the returned object has the same methods as a bar (``update``, ``set_postfix``,
``set_description``, ``write``, iteration, …) and prints nothing but :meth:`NullBar.write`'s text.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class NullBar:
    """A progress bar that draws nothing: what :func:`progress_bar` returns when none is shown.

    Attributes ``n`` (steps counted by :meth:`update`) and ``total`` behave as in tqdm.
    """

    def __init__(self, iterable: Iterable[Any] | None = None, total: float | None = None,
                 initial: float = 0, **_options: Any) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total = total
        self.n = initial

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("this progress bar was made without an iterable")
        for item in self.iterable:
            yield item
            self.n += 1

    def __len__(self) -> int:
        return int(self.total or 0)

    def __enter__(self) -> NullBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        pass

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass

    @staticmethod
    def write(s: str, file: Any = None, end: str = "\n") -> None:
        """Print ``s`` (what ``tqdm.write`` does when no bar is in the way)."""
        print(s, end=end, file=file if file is not None else sys.stdout, flush=True)


def progress_bar(iterable: Iterable[Any] | None = None, /, **options: Any) -> Any:
    """A ``tqdm`` bar over ``iterable`` (or of ``total=`` steps), or a :class:`NullBar`.

    Args:
        iterable: what to iterate over, as for ``tqdm(iterable)``.
        **options: tqdm's keyword arguments (``total``, ``desc``, ``leave``, ``disable``,
            ``file``, ``dynamic_ncols``, …); ``disable=True`` always gives a :class:`NullBar`.
    """
    if options.get("disable") or not _is_terminal(options.get("file") or sys.stderr):
        return NullBar(iterable, **options)
    try:
        from tqdm import tqdm
    except ImportError:
        return NullBar(iterable, **options)
    return tqdm(iterable, **options)
