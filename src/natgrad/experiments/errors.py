"""The error an experiment raises when it cannot run with its settings."""

from __future__ import annotations


class ExperimentError(ValueError):
    """The settings name something unusable (a checkpoint that does not load, a model that does
    not fit the data); the CLI prints it as a one-line usage error."""
