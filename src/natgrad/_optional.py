"""Optional dependencies: import them on first use, or fail naming the extra that installs them.

matplotlib (figures), scipy (:meth:`natgrad.fisher.LinearOperator.to_scipy`), tqdm (progress
bars), transformers (the tiny Hugging Face models of :mod:`natgrad.models.zoo`) and
pytorch-optimizer (SOAP, Shampoo and PSGD-Kron for the optimizer race) and laplace-torch
(:mod:`natgrad.integrations.laplace`) serve one feature each, so they are extras of the package
(``pip install 'natgrad[plots]'``, ``[scipy]``, ``[progress]``, ``[all]`` for these three,
``[zoo]``, ``[peers]`` and ``[laplace]``) rather than hard dependencies.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: importable module → the extra of ``natgrad`` that installs it
EXTRAS = {"matplotlib": "plots", "scipy": "scipy", "tqdm": "progress", "transformers": "zoo",
          "pytorch_optimizer": "peers", "laplace": "laplace"}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` (a key of :data:`EXTRAS`, or a submodule of one) for ``feature``.

    Raises:
        MissingExtraError: when it is not installed, e.g. ``matplotlib is needed for plots but
            is not installed: pip install 'natgrad[plots]'``.
    """
    top = module.split(".", 1)[0]
    if top not in EXTRAS:
        raise ValueError(f"{top!r} is not an optional dependency of natgrad; known: "
                         f"{', '.join(sorted(EXTRAS))}")
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if exc.name is not None and exc.name.split(".", 1)[0] != top:
            raise  # installed, but broken: show the real error
        raise MissingExtraError(f"{top} is needed for {feature} but is not installed: "
                                f"pip install 'natgrad[{EXTRAS[top]}]'") from None
