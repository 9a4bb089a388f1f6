"""Reader and writer for the IDX format of MNIST and Fashion-MNIST (raw or gzip-compressed).

IDX layout: two zero bytes, a type code, the number of dimensions ``k``, then ``k`` big-endian
uint32 sizes, then the data in row-major order. Only the unsigned-byte type (``0x08``) is used by
MNIST-style files and only that type is supported here.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from .errors import DataError

_UBYTE = 0x08


def _read_bytes(path: Path) -> bytes:
    """Whole file contents, decompressed when the name ends in ``.gz``."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: not a readable gzip file ({exc})") from exc


def read_idx(path: str | Path, expected_ndim: int | None = None) -> np.ndarray:
    """Read an IDX file of unsigned bytes.

    Args:
        path: the file, raw or ``.gz``.
        expected_ndim: if given, the number of dimensions the header must declare
            (3 for images ``(N, rows, cols)``, 1 for labels ``(N,)``).

    Returns:
        A uint8 array with the shape given in the header.

    Raises:
        DataError: missing file, bad magic, unsupported type, wrong dimension count, or a payload
            whose length does not match the header.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, expected at least 4)")
    zero0, zero1, dtype, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or ndim == 0:
        raise DataError(f"{path}: bad IDX magic 0x{raw[:4].hex()} (expected 0x000008NN)")
    if dtype != _UBYTE:
        raise DataError(f"{path}: unsupported IDX type code 0x{dtype:02x} (expected 0x08 ubyte)")
    if expected_ndim is not None and ndim != expected_ndim:
        raise DataError(f"{path}: IDX file has {ndim} dimensions, expected {expected_ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, expected {header})")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape)) if shape else 0
    got = len(raw) - header
    if got != expected:
        raise DataError(
            f"{path}: IDX payload has {got} bytes, expected {expected} for shape {tuple(shape)}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write a uint8 array as IDX (gzip-compressed when ``path`` ends in ``.gz``)."""
    path = Path(path)
    array = np.ascontiguousarray(array, dtype=np.uint8)
    payload = bytes([0, 0, _UBYTE, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)
    return path
