"""Errors raised by the data loaders."""

from __future__ import annotations


class DataError(ValueError):
    """A data file is missing, truncated or corrupt, or a data set cannot be located.

    The message is one line that names the file and says what was expected.
    """
