"""Shakespeare's works, character by character: the embedded ``shakespeare_char.npz``.

42 works (37 plays, the sonnets, four poems; about 5 million characters of 84 kinds) in the
Project Gutenberg editions shipped by the ``shakespeare`` package (see
benchmarks/make_shakespeare_char.py and ``shakespeare_char.LICENSE.md``). Each work is cut into
its first 90 % (training), next 5 % (validation) and last 5 % (test) of characters, so the three
splits are disjoint and each holds every work.

A sample is a window of ``context`` consecutive characters as int64 ids ``(T,)`` and, as its
target, the same window shifted by one (the next character at every position), like the
registry's other token data sets: ``x, y`` int64 ``(N, T)``. Windows start every ``stride``
characters (``stride = context`` by default: non-overlapping windows that cover each split once).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .base import ArrayDataset
from .errors import DataError
from .info import SHAKESPEARE_CHAR_INFO as INFO
from .info import DatasetInfo

SPLITS = ("train", "validation", "test")
FILE = "shakespeare_char.npz"


def embedded_path() -> Path:
    """Location of ``shakespeare_char.npz`` inside the installed package."""
    return Path(str(resources.files("natgrad.data").joinpath(FILE)))


def load_corpus(path: str | Path | None = None) -> tuple[str, dict[str, np.ndarray]]:
    """``(vocabulary, {split: uint8 ids (n,)})``; the vocabulary's ``i``-th character is id ``i``.

    Raises:
        DataError: the file is missing, damaged or lacks an array.
    """
    path = Path(path) if path is not None else embedded_path()
    if not path.is_file():
        raise DataError(f"{path}: embedded Shakespeare text not found (reinstall natgrad)")
    try:
        with np.load(path) as archive:
            vocab = "".join(map(chr, archive["vocab"]))
            ids = {k: archive[k] for k in SPLITS}
    except KeyError as exc:
        raise DataError(f"{path}: missing array {exc} (expected vocab, {', '.join(SPLITS)})"
                        ) from exc
    except Exception as exc:  # zipfile / OS errors of a damaged archive
        raise DataError(f"{path}: not a readable .npz archive ({exc})") from exc
    if any(int(a.max(initial=0)) >= len(vocab) for a in ids.values()):
        raise DataError(f"{path}: ids outside the vocabulary of {len(vocab)} characters")
    return vocab, ids


def encode(text: str, vocab: str) -> torch.Tensor:
    """Character ids of ``text``, int64 ``(len(text),)``; ``ValueError`` for a character the
    vocabulary lacks."""
    index = {c: i for i, c in enumerate(vocab)}
    missing = sorted(set(text) - set(index))
    if missing:
        raise ValueError(f"characters {missing} are not in the vocabulary")
    return torch.tensor([index[c] for c in text], dtype=torch.int64)


def decode(ids: torch.Tensor | np.ndarray, vocab: str) -> str:
    """The text of a 1-d sequence of ids."""
    return "".join(vocab[int(i)] for i in ids)


def windows(ids: np.ndarray, context: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``ids[s : s+T]`` and targets ``ids[s+1 : s+T+1]`` for ``s = 0, stride, …``, int64
    ``(N, T)``: every window whose target fits in ``ids``."""
    n = (len(ids) - context - 1) // stride + 1
    if n < 1:
        raise ValueError(f"a split of {len(ids)} characters holds no window of {context} + 1")
    t = torch.from_numpy(ids.astype(np.int64))
    starts = torch.arange(n) * stride
    idx = starts[:, None] + torch.arange(context)
    return t[idx], t[idx + 1]


def _check(context: int, stride: int | None) -> int:
    for name, v in (("context", context), ("stride", stride)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return context if stride is None else stride


def load_shakespeare_splits(context: int = INFO.input_shape[0], stride: int | None = None,
                            path: str | Path | None = None) -> dict[str, ArrayDataset]:
    """``{"train", "validation", "test"}`` → windows of ``context`` characters and their
    next-character targets (see the module docstring).

    Args:
        context: characters per sample ``T`` (the model's context length).
        stride: characters between window starts (default ``context``).
        path: an alternative ``.npz`` with the same arrays (default: the embedded file).
    """
    step = _check(context, stride)
    vocab, ids = load_corpus(path)
    info = DatasetInfo(INFO.name, (context,), len(vocab), vocab=len(vocab))
    return {k: ArrayDataset(*windows(ids[k], context, step), info) for k in SPLITS}


def load_shakespeare_char(context: int = INFO.input_shape[0], stride: int | None = None,
                          path: str | Path | None = None) -> tuple[ArrayDataset, ArrayDataset]:
    """``(train, test)`` of :func:`load_shakespeare_splits` (the registry's convention; the
    validation split is there)."""
    splits = load_shakespeare_splits(context, stride, path)
    return splits["train"], splits["test"]
