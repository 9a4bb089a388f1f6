"""The experiments natgrad's commands run, as library functions.

* :mod:`.train` — the plain torch.optim training loop with timing, evaluation and callbacks;
* :mod:`.compare` — one model, several optimizers, the same start (``natgrad compare``);
* :mod:`.analyze` — the Fisher analysis of a fresh or trained model (``natgrad analyze``).

``natgrad.cli`` and ``natgrad.reproduce`` call these; nothing here imports the CLI.
"""

from .errors import ExperimentError

__all__ = ["ExperimentError"]
